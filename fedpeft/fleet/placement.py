"""Where a fleet client runs: the machine/Ray node (logged as `worker_node` in clients.jsonl, so a
run on a Ray cluster shows which node trained which client) and the torch device it trains on."""
from __future__ import annotations

import socket
import sys

from fedpeft.fleet.config import RunConfig


def worker_node() -> str:
    """'HOSTNAME/RAY_NODE_ID' inside a Ray worker (the simulation), else 'HOSTNAME' (a real board)."""
    host = socket.gethostname()
    ray = sys.modules.get("ray")  # never import Ray here: a deployed client has no use for it
    if ray is not None and ray.is_initialized():
        return f"{host}/{ray.get_runtime_context().get_node_id()}"
    return host


def client_device(cfg: RunConfig):
    """The torch device a client trains on: CPU unless the run asks for cuda/auto *and* reserves a
    GPU share per client (client_gpus > 0), so clients never share an unreserved GPU."""
    import torch

    from fedpeft.train import resolve_device

    if cfg.device == "cpu" or cfg.client_gpus <= 0:
        return torch.device("cpu")
    return resolve_device(cfg.device)
