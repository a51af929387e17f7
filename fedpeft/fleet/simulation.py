"""Run a fleet in one process tree: Flower's simulation engine on the Ray backend.

Ray is started here, bound to 127.0.0.1, with one CPU per virtual client so several clients
train side by side on a small machine, and it is shut down when the run ends, whatever happens.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import replace
from pathlib import Path

from fedpeft.devices import load_fleet
from fedpeft.fleet import setup
from fedpeft.fleet.config import RunConfig
from fedpeft.paths import cache_dir


def resolved(cfg: RunConfig) -> RunConfig:
    """Absolute paths (Ray workers may run elsewhere) and the fleet's real size."""
    num_clients = len(load_fleet(cfg.fleet)) if cfg.fleet else cfg.num_clients
    return replace(cfg, out=str(Path(cfg.out).resolve()), cache_dir=str(cache_dir(cfg.cache_dir or None).resolve()),
                   fleet=str(Path(cfg.fleet).resolve()) if cfg.fleet else "", num_clients=num_clients)


def backend_config(cpus: int | None = None) -> dict:
    cpus = cpus or os.cpu_count() or 1
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False,
                      "_node_ip_address": "127.0.0.1", "log_to_driver": False},
    }


def run_fleet(cfg: RunConfig, verbose: bool = False) -> dict:
    import ray
    from flwr.simulation import run_simulation

    from clients.client_app import make_client_app
    from strategies.server_app import make_server_app

    cfg = resolved(cfg)
    os.environ["FEDPEFT_CACHE"] = cfg.cache_dir  # Ray workers inherit it
    # Ray warns at every start that a future version stops overriding CUDA_VISIBLE_DEVICES when
    # num_gpus=0; opting into that behaviour now is what a CPU fleet wants anyway.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    setup.checkpoint_for(cfg)  # pre-train before Ray starts, so every client finds it cached
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", message=".*run_simulation.*")
    try:
        run_simulation(server_app=make_server_app(cfg), client_app=make_client_app(cfg),
                       num_supernodes=cfg.num_clients, backend_name="ray", backend_config=backend_config(),
                       verbose_logging=verbose)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    summary_path = Path(cfg.out) / "summary.json"
    if not summary_path.is_file():
        raise RuntimeError(f"the simulation ended without writing {summary_path}; see the log above")
    return json.loads(summary_path.read_text())
