"""One client's round: pick a setting within the device's budget, start from the global adapter
state, train on the local partition, and reply with the delta and what it cost.

The device comes from the node config, so the same code serves the simulation (partition-id
indexes the fleet) and a real board (`--node-config "device=raspberry_pi_5 partition-id=0 ..."`).
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from fedpeft.devices import Device, comm_time_s, compute_time_s, energy_j, load_catalog, with_overrides
from fedpeft.errors import UsageError
from fedpeft.fleet import setup
from fedpeft.fleet.budget import Setting, choose_setting, round_timing, step_cost
from fedpeft.fleet.clock import client_timing, steps_within
from fedpeft.fleet.config import RunConfig
from fedpeft.fleet.placement import client_device, worker_node
from fedpeft.methods.galore_upload import LEFT, RIGHT, factored_upload
from fedpeft.paths import atomic_write_bytes
from fedpeft.payload import decode, encode, record_bytes
from fedpeft.profiling.memory import CATEGORIES
from fedpeft.train import train, usable_batches
from strategies.aggregation import bn_keys, client_upload, lora_exact, lora_pairs
from strategies.robust import scaled_update


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
    fleet = setup.fleet_for(cfg)
    if not 0 <= partition_id < len(fleet):
        raise UsageError(f"node config: partition-id {partition_id} outside the fleet of {len(fleet)} clients")
    return partition_id, fleet[partition_id].device


def requested_method(cfg: RunConfig, node_config: dict, client_id: int) -> tuple[str, int | None]:
    """(method, rank) this client asks for: the node config's `method`/`rank` (a real board), else
    its fleet entry's, else the run's (rank None: the run's)."""
    if "method" in node_config:
        return str(node_config["method"]), int(node_config["rank"]) if "rank" in node_config else None
    return setup.request_of(cfg, client_id) if "device" not in node_config else (cfg.method, None)


def _refactor_lora(cfg: RunConfig, global_delta: dict, rank: int) -> dict:
    """A client with another rank than the global adapter gets its own rank by truncated SVD."""
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


@dataclass(frozen=True)
class Conditions:
    """This client-round's orders from the server: its conditions on the virtual clock
    (strategies/virtual_clock.py: the training RAM the device lends now, the share of its FLOP/s,
    the round's slowdown factor; defaults: the catalog device at full speed, as on a real board),
    and in a mixed-method run the (method, rank) whose form the payload is in (strategies/mixed.py)."""

    ram_train_bytes: int | None = None
    compute_fraction: float = 1.0
    jitter: float = 1.0
    form: tuple[str, int] | None = None

    @classmethod
    def from_config(cls, config) -> "Conditions":
        """From the train message's ConfigRecord (`sim-*` and `form-*` keys); values out of range are an error."""
        ram = config.get("sim-ram-train-bytes")
        fraction, jitter = float(config.get("sim-compute-fraction", 1.0)), float(config.get("sim-jitter", 1.0))
        if ram is not None and int(ram) <= 0 or not 0 < fraction <= 1 or not jitter > 0:
            raise UsageError(f"train config: sim-* conditions out of range: ram={ram}, compute_fraction={fraction}, "
                             f"jitter={jitter}")
        form = (str(config["form-method"]), int(config.get("form-rank", 0))) if "form-method" in config else None
        return cls(None if ram is None else int(ram), fraction, jitter, form)


class RoundLog:
    """What a reply reports, filled in as the round goes: `metrics` (numbers) and `info` (strings)."""

    def __init__(self, cfg: RunConfig, node_config: dict, arrays_in: ArrayRecord, server_round: int,
                 conditions: Conditions | None = None):
        self.start = self._lap = time.perf_counter()
        self.started_unix = time.time()
        self.timings: dict[str, float] = {}  # seconds per phase of this round (lap), sent as t.<phase>_s
        # Threads: in the simulation Ray sets OMP_NUM_THREADS to the client's CPUs; a real board uses all its cores.
        self.client_id, self.device = device_for(cfg, node_config)
        self.requested = requested_method(cfg, node_config, self.client_id)
        self.conditions = conditions or Conditions()
        if self.conditions.ram_train_bytes is not None:  # REDS: the device lends less (or more) RAM this round
            self.device = with_overrides(self.device, "sim-ram-train-bytes", ram_train_bytes=self.conditions.ram_train_bytes)
        self.bytes_down = record_bytes(arrays_in)
        self.info = {"device": self.device.name, "method": cfg.method, "status": "ok", "chosen": "", "adapted": False,
                     "upload_codec": cfg.upload_codec, "error": "", "worker_node": worker_node(), "train_device": "cpu"}
        self.metrics = {"client_id": self.client_id, "round": server_round, "bytes_down": self.bytes_down,
                        "bytes_up": 0, "ram_budget_bytes": int(self.device.ram_train_bytes), "examples": 0,
                        "steps": 0, "rank": 0, "batch_size": 0, "num-examples": 0}

    def lap(self, phase: str) -> None:
        """Charge the time since the previous lap (or the start) to `phase`: cheap timers that let the
        overhead benchmark (experiments/benchmarks/sim_overhead.py) split a client round."""
        now = time.perf_counter()
        self.timings[phase] = self.timings.get(phase, 0.0) + now - self._lap
        self._lap = now

    def finish(self, arrays: ArrayRecord, flops: dict | None = None, traffic: dict | None = None) -> ClientReply:
        """Close the round: FLOPs (totals for the round), simulated device time and energy, wall time."""
        self.lap("upload" if "train" in self.timings else "other")
        self.metrics.update({f"t.{phase}_s": seconds for phase, seconds in self.timings.items()})
        self.metrics["t.started_unix"] = self.started_unix
        flops = {k: int(v) for k, v in (flops or {}).items()}
        compute_s = compute_time_s(self.device, flops.get("total", 0))
        if traffic and self.metrics.get("steps") and self.metrics.get("flops_per_step"):  # the roofline, per step
            compute_s = compute_time_s(self.device, self.metrics["flops_per_step"], traffic) * self.metrics["steps"]
        comm_s = comm_time_s(self.device, self.metrics["bytes_up"], self.bytes_down)
        self.metrics.update({f"flops.{k}": v for k, v in flops.items()})
        self.metrics.update(compute_s=compute_s, comm_s=comm_s, device_time_s=compute_s + comm_s,
                            energy_j=energy_j(self.device, compute_s, comm_s), wall_s=time.perf_counter() - self.start)
        return ClientReply(arrays, self.metrics, self.info)

    def failed(self, exc: BaseException) -> ClientReply:
        """A round that raised: reported with the device and what was known, never fatal to the server."""
        self.info["status"] = "failed"
        self.info["error"] = f"{type(exc).__name__}: {exc}"[:500]
        self.metrics["bytes_up"] = 0
        return self.finish(ArrayRecord())


def crash_if_injected(cfg: RunConfig, node_config: dict) -> None:
    """Fault injection: a client in fail_clients dies mid-round, past any handler in this module, so
    the server gets Flower's error reply (as from a killed process), not a report."""
    client_id = node_config.get("partition-id")
    if client_id is not None and int(client_id) in cfg.client_ids("fail_clients"):
        raise RuntimeError(f"injected failure: client {client_id} is in fail_clients")


def client_round(cfg: RunConfig, node_config: dict, arrays_in: ArrayRecord, server_round: int,
                 conditions: Conditions | None = None) -> ClientReply:
    """One training round. The server only asks clients it found reachable on the virtual clock;
    `conditions` are this round's budget and speed there (None: the catalog device at full speed)."""
    log = RoundLog(cfg, node_config, arrays_in, server_round, conditions)  # a bad node config raises here
    try:
        return _train_round(cfg, log, arrays_in, server_round)
    except Exception as exc:  # noqa: BLE001  (whatever broke this round is this client's, reported as failed)
        return log.failed(exc)


def steps_for_deadline(cfg: RunConfig, log: RoundLog, setting: Setting, adapter, examples: int) -> tuple[int, int]:
    """(steps planned, steps that fit the round's deadline) under straggler_policy=partial: the same
    timing the server settles the round with (fedpeft.fleet.clock), from this round's conditions.
    The upload's size is known before training: it depends on the tensors' shapes, not their values
    (random stand-ins, as all-zero or identical tensors would be encoded smaller)."""
    planned = cfg.local_epochs * usable_batches(examples, setting.batch_size, adapter.trains_bn_stats)
    if setting.max_steps is not None:
        planned = min(planned, setting.max_steps)
    generator = torch.Generator().manual_seed(0)
    upload = client_upload(cfg, adapter.delta(), adapter.model)
    if cfg.factored_galore and setting.method == "galore":  # factors of rank r, whatever their values
        params, rank = dict(adapter.model.named_parameters()), adapter.method.rank
        for name in adapter.projected():
            shape = params[name].shape
            del upload[name]
            upload[name + LEFT], upload[name + RIGHT] = torch.zeros(shape[0], rank), torch.zeros(rank, shape[1:].numel())
    stand_in = {k: (torch.rand(v.shape, generator=generator) + 1).to(v.dtype) if v.is_floating_point()
                else torch.randint(0, 2**30, v.shape, generator=generator).to(v.dtype) for k, v in upload.items()}
    upload_bytes = record_bytes(encode(stand_in, cfg.upload_codec)[0])
    timing = client_timing(log.device, setting.cost.total_flops, planned, log.bytes_down, upload_bytes,
                           compute_fraction=log.conditions.compute_fraction, jitter=log.conditions.jitter,
                           traffic_per_step=setting.cost.traffic)
    return planned, steps_within(cfg.round_deadline_s, timing)


def _train_round(cfg: RunConfig, log: RoundLog, arrays_in: ArrayRecord, server_round: int) -> ClientReply:
    info, metrics, client_id = log.info, log.metrics, log.client_id
    task = setup.task_for(cfg)
    data = setup.client_data(cfg, client_id)
    # auto with a deadline: the walk also asks each setting to finish in time, as the server predicts it
    timing = round_timing(cfg, len(data.labels), log.conditions.compute_fraction, log.conditions.jitter)
    setting = choose_setting(cfg, log.device, task.num_classes, *log.requested, timing=timing)
    if setting.predicted_s is not None:
        metrics["predicted_s"] = setting.predicted_s
    info.update(method=setting.method, chosen=setting.describe(), adapted=setting.adapted)
    if setting.adapted:
        info["chosen"] += f" (adapted from {cfg.method}{f' r={cfg.rank}' if cfg.rank else ''} batch={cfg.batch_size})"
    metrics.update(rank=setting.rank or 0, batch_size=setting.batch_size, **_memory_metrics(setting))
    log.lap("lookup")
    if setting.status != "ok":
        info.update(status="over_budget", error=setting.reason)
        return log.finish(ArrayRecord())

    shared_mask = cfg.shares_mask and setting.method == cfg.method
    calibration = None if shared_mask else data.images[: setup.CALIBRATION_EXAMPLES]  # shared: the server's mask
    adapter = setup.attach(cfg, setting.method, setting.rank, calibration)
    if hasattr(adapter, "realised_density"):  # TaskEdge: what its mask trains, beside what was asked
        metrics.update(density_realised=float(adapter.realised_density), density_requested=float(adapter.method.density))
    global_delta: dict = {}
    form = log.conditions.form
    if form is not None:  # a mixed run: the server sent the form of the setting it expects this client to pick
        info["start"] = "global" if form == (setting.method, setting.rank or 0) and len(arrays_in) > 0 else "fresh"
        if info["start"] == "global":
            global_delta = decode(arrays_in)
            if setting.method == "taskedge":  # the fleet's change folded into its weights; its own mask on top
                adapter.start_from(global_delta)
            else:
                adapter.load_delta(global_delta)
    elif setting.method == cfg.method and len(arrays_in) > 0:
        global_delta = decode(arrays_in)
        if cfg.method in ("lora", "dora") and cfg.lora_mode == "exact":  # the only mode with mixed ranks
            global_delta = _refactor_lora(cfg, global_delta, setting.rank)
        if cfg.fedbn:  # BatchNorm never comes down: the device's own (or pre-trained) BN fills in
            global_delta = {**adapter.delta(), **global_delta}
        if shared_mask:
            adapter.load_delta(global_delta)  # adopt the fleet's mask and its values
        else:
            adapter.start_from(global_delta)
    if cfg.fedbn:
        _load_local_bn(cfg, adapter, client_id)
    poisoned = client_id in cfg.client_ids("poison_clients")
    start = client_upload(cfg, adapter.delta(), adapter.model) if poisoned else None
    max_steps = setting.max_steps
    if cfg.round_deadline_s > 0 and cfg.straggler_policy == "partial":
        planned, max_steps = steps_for_deadline(cfg, log, setting, adapter, len(data.labels))
        metrics["steps_planned"] = planned
    log.lap("build")
    device = client_device(cfg)
    info["train_device"] = str(device)
    result = train(adapter, data.images, data.labels, epochs=cfg.local_epochs, batch_size=setting.batch_size,
                   max_steps=max_steps, seed=cfg.seed * 100003 + server_round * 1009 + client_id, device=device)
    log.lap("train")
    delta = adapter.delta()
    if cfg.fedbn:
        _save_local_bn(cfg, adapter, delta, client_id)
    delta = client_upload(cfg, delta, adapter.model)  # e.g. no BN under FedBN, no indices with a shared mask
    if client_id in cfg.client_ids("corrupt_clients"):
        delta = _corrupted(delta)
    examples = result.examples
    if poisoned:  # fault injection: the update scaled (sign-flipped by default), the example count inflated
        delta = scaled_update(delta, start, cfg.poison_scale)
        examples = cfg.poison_examples or examples
    if cfg.factored_galore and setting.method == "galore":  # the round's update as low-rank factors
        delta, metrics["galore_dense_weights"] = factored_upload(delta, global_delta, adapter.bases(),
                                                                       dict(adapter.model.named_parameters()))
    record, encoded = encode(delta, cfg.upload_codec)
    metrics.update(examples=examples, steps=result.steps, loss=result.loss, bytes_up=encoded.bytes,
                   flops_per_step=int(setting.cost.total_flops),
                   quant_error=float(encoded.max_abs_error), **{"num-examples": examples})
    return log.finish(record, {k: v * result.steps for k, v in setting.cost.flops.items()}, setting.cost.traffic)


def identify(cfg: RunConfig, node_config: dict) -> ClientReply:
    """The server's roll call before round 1: who this node is (client id, device), nothing else.
    The server samples by client id, so a seed picks the same clients in every run (simulated node
    ids are random), and a node that later fails or times out is logged with its client and device."""
    client_id, device = device_for(cfg, node_config)
    clock = "real" if "device" in node_config else "virtual"  # a real board lives on its own clock
    return ClientReply(ArrayRecord(), {"client_id": client_id},
                       {"device": device.name, "phase": "identify", "clock": clock})


def calibration_round(cfg: RunConfig, node_config: dict) -> ClientReply:
    """Shared-mask TaskEdge, before round 1: this client's activation statistics (sums of squared
    inputs of every masked layer over a calibration batch). They sum across clients, so the server
    ranks weights on the whole fleet's data without seeing any of it."""
    from fedpeft.methods import make_method
    from fedpeft.methods.taskedge import calibration_sums

    log = RoundLog(cfg, node_config, ArrayRecord(), 0)
    try:
        images = setup.client_data(cfg, log.client_id).images[: setup.CALIBRATION_EXAMPLES]
        method = make_method(cfg.method, **cfg.method_hparams())
        sums = calibration_sums(setup.pretrained_model(cfg), method, images)
        record, encoded = encode(sums)
        log.info["chosen"] = "calibration"
        log.metrics.update(examples=len(images), bytes_up=encoded.bytes, **{"num-examples": len(images)})
        # One forward pass over the calibration batch: a training step's forward FLOPs, scaled by batch.
        cost = step_cost(cfg, cfg.method, cfg.rank, cfg.batch_size, setup.task_for(cfg).num_classes)
        forward = int(cost.flops["forward"] * len(images) / cfg.batch_size)
        return log.finish(record, {"forward": forward, "backward": 0, "optimizer": 0, "total": forward})
    except Exception as exc:  # noqa: BLE001  (reported as failed; the server builds the mask without it)
        return log.failed(exc)


def _corrupted(delta: dict) -> dict:
    """A malformed upload for fault tests: one tensor truncated, one unexpected tensor added."""
    key = next(iter(delta))
    return {**delta, key: delta[key].reshape(-1)[:-1].clone(), "unexpected.tensor": torch.zeros(3)}


# -- FedBN: BatchNorm stays on the device. Virtual clients keep no memory between rounds, so a
# client's BN tensors live in a small file under the run directory.
def _bn_file(cfg: RunConfig, client_id: int) -> Path:
    return Path(cfg.out) / "client_state" / f"bn-{client_id}.pt"


def _save_local_bn(cfg: RunConfig, adapter, delta: dict, client_id: int) -> None:
    buffer = io.BytesIO()
    torch.save({k: delta[k] for k in bn_keys(delta, adapter.model)}, buffer)
    atomic_write_bytes(_bn_file(cfg, client_id), buffer.getvalue())


def _load_local_bn(cfg: RunConfig, adapter, client_id: int) -> None:
    path = _bn_file(cfg, client_id)
    if path.is_file():
        local = torch.load(path, weights_only=True)
        merged = {**adapter.delta(), **local}
        adapter.load_delta(merged)
