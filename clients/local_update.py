"""One client's round: pick a setting within the device's budget, start from the global adapter
state, train on the local partition, and reply with the delta and what it cost.

The device comes from the node config, so the same code serves the simulation (partition-id
indexes the fleet) and a real board (`--node-config "device=raspberry_pi_5 partition-id=0 ..."`).
"""
from __future__ import annotations

import io
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from fedpeft.devices import Device, comm_time_s, compute_time_s, default_fleet, energy_j, load_catalog, load_fleet
from fedpeft.errors import UsageError
from fedpeft.fleet import setup
from fedpeft.fleet.budget import Setting, choose_setting
from fedpeft.fleet.config import RunConfig
from fedpeft.methods.layers import is_batchnorm
from fedpeft.paths import atomic_write_bytes
from fedpeft.payload import decode, encode, record_bytes
from fedpeft.profiling.memory import CATEGORIES
from fedpeft.train import train


@dataclass
class ClientReply:
    arrays: ArrayRecord
    metrics: dict  # numbers only (Flower MetricRecord)
    info: dict  # strings and bools (Flower ConfigRecord)
    extra: dict = field(default_factory=dict)


def device_for(cfg: RunConfig, node_config: dict) -> tuple[int, Device]:
    """(client id, device) from the node config: a named catalog device, else the fleet entry."""
    try:
        partition_id = int(node_config["partition-id"])
    except (KeyError, TypeError, ValueError):
        raise UsageError("node config: partition-id must be an integer") from None
    if "device" in node_config:
        catalog = load_catalog()
        name = str(node_config["device"])
        if name not in catalog:
            raise UsageError(f"node config: unknown device {name!r}; allowed: {', '.join(sorted(catalog))}")
        return partition_id, catalog[name]
    fleet = load_fleet(cfg.fleet) if cfg.fleet else default_fleet(cfg.num_clients, seed=cfg.seed)
    if not 0 <= partition_id < len(fleet):
        raise UsageError(f"node config: partition-id {partition_id} outside the fleet of {len(fleet)} clients")
    return partition_id, fleet[partition_id].device


def _refactor_lora(cfg: RunConfig, global_delta: dict, rank: int) -> dict:
    """A client with another rank than the global adapter gets its own rank by truncated SVD."""
    from strategies.aggregation import lora_exact, lora_pairs

    pairs = lora_pairs(global_delta)
    if not pairs or next(iter(global_delta[a].shape[0] for a in pairs)) == rank:
        return global_delta
    return lora_exact([global_delta], [1.0], ranks_out=rank, lora_alpha=cfg.alpha)


def _memory_metrics(setting: Setting) -> dict:
    memory = setting.cost.memory if setting.cost else {}
    out = {"peak_memory_bytes": int(memory.get("peak_bytes", 0))}
    for cat in CATEGORIES:
        out[f"mem.{cat}"] = int(memory.get("by_category", {}).get(cat, 0))
    return out


def client_round(cfg: RunConfig, node_config: dict, arrays_in: ArrayRecord, server_round: int) -> ClientReply:
    start = time.perf_counter()
    # Threads: in the simulation Ray sets OMP_NUM_THREADS to the client's CPUs; a real board uses all its cores.
    client_id, device = device_for(cfg, node_config)
    on_real_board = "device" in node_config
    bytes_down = record_bytes(arrays_in)
    info = {"device": device.name, "method": cfg.method, "status": "ok", "chosen": "", "adapted": False,
            "upload_codec": cfg.upload_codec, "error": ""}
    metrics = {"client_id": client_id, "round": server_round, "bytes_down": bytes_down, "bytes_up": 0,
               "ram_budget_bytes": int(device.ram_train_bytes), "examples": 0, "steps": 0, "rank": 0,
               "batch_size": 0, "num-examples": 0}

    def finish(arrays: ArrayRecord, flops_per_step: dict | None = None) -> ClientReply:
        steps = metrics["steps"]
        flops = {k: int(v) * steps for k, v in (flops_per_step or {}).items()}
        compute_s = compute_time_s(device, flops.get("total", 0))
        comm_s = comm_time_s(device, metrics["bytes_up"], bytes_down)
        metrics.update({f"flops.{k}": v for k, v in flops.items()})
        metrics.update(compute_s=compute_s, comm_s=comm_s, device_time_s=compute_s + comm_s,
                       energy_j=energy_j(device, compute_s, comm_s), wall_s=time.perf_counter() - start)
        return ClientReply(arrays, metrics, info)

    # Availability is simulated; a real board that answered is available.
    if not on_real_board and random.Random(f"{cfg.seed}:{server_round}:{client_id}").random() >= device.availability:
        info["status"] = "unavailable"
        metrics["bytes_down"] = bytes_down = 0  # an unreachable device downloads nothing
        return finish(ArrayRecord())

    task = setup.task_for(cfg)
    setting = choose_setting(cfg, device, task.num_classes)
    info.update(method=setting.method, chosen=setting.describe(), adapted=setting.adapted)
    if setting.adapted:
        info["chosen"] += f" (adapted from {cfg.method}{f' r={cfg.rank}' if cfg.rank else ''} batch={cfg.batch_size})"
    metrics.update(rank=setting.rank or 0, batch_size=setting.batch_size, **_memory_metrics(setting))
    if setting.status != "ok":
        info.update(status="over_budget", error=setting.reason)
        return finish(ArrayRecord())

    data = setup.client_data(cfg, client_id)
    adapter = setup.attach(cfg, setting.method, setting.rank, data.images[: setup.CALIBRATION_EXAMPLES])
    if setting.method == cfg.method and len(arrays_in) > 0:
        global_delta = decode(arrays_in)
        if cfg.method in ("lora", "dora"):
            global_delta = _refactor_lora(cfg, global_delta, setting.rank)
        adapter.start_from(global_delta)
    if cfg.fedbn:
        _load_local_bn(cfg, adapter, client_id)
    result = train(adapter, data.images, data.labels, epochs=cfg.local_epochs, batch_size=setting.batch_size,
                   max_steps=setting.max_steps, seed=cfg.seed * 100003 + server_round * 1009 + client_id)
    if client_id in cfg.client_ids("fail_clients"):
        raise RuntimeError(f"injected failure: client {client_id} is in fail_clients")
    delta = adapter.delta()
    if client_id in cfg.client_ids("corrupt_clients"):
        delta = _corrupted(delta)
    if cfg.fedbn:
        delta = _keep_local_bn(cfg, adapter, delta, client_id)
    record, encoded = encode(delta, cfg.upload_codec)
    metrics.update(examples=result.examples, steps=result.steps, loss=result.loss, bytes_up=encoded.bytes,
                   quant_error=float(encoded.max_abs_error), **{"num-examples": result.examples})
    return finish(record, setting.cost.flops)


def _corrupted(delta: dict) -> dict:
    """A malformed upload for fault tests: one tensor truncated, one unexpected tensor added."""
    key = next(iter(delta))
    return {**delta, key: delta[key].reshape(-1)[:-1].clone(), "unexpected.tensor": torch.zeros(3)}


# -- FedBN: BatchNorm stays on the device. Virtual clients keep no memory between rounds, so a
# client's BN tensors live in a small file under the run directory.
def _bn_file(cfg: RunConfig, client_id: int) -> Path:
    return Path(cfg.out) / "client_state" / f"bn-{client_id}.pt"


def _bn_keys(adapter, delta: dict) -> list[str]:
    bn_modules = {n for n, m in adapter.model.named_modules() if is_batchnorm(m)}
    return [k for k in delta if any(k.startswith(m + ".") or ("." + m + ".") in k for m in bn_modules)]


def _keep_local_bn(cfg: RunConfig, adapter, delta: dict, client_id: int) -> dict:
    keys = _bn_keys(adapter, delta)
    buffer = io.BytesIO()
    torch.save({k: delta[k] for k in keys}, buffer)
    atomic_write_bytes(_bn_file(cfg, client_id), buffer.getvalue())
    return {k: v for k, v in delta.items() if k not in set(keys)}


def _load_local_bn(cfg: RunConfig, adapter, client_id: int) -> None:
    path = _bn_file(cfg, client_id)
    if path.is_file():
        local = torch.load(path, weights_only=True)
        merged = {**adapter.delta(), **local}
        adapter.load_delta(merged)
