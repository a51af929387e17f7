"""Budgets: before training, a client looks up the cost of one step (cached profile) and checks it
against its device. Memory budget = the device's RAM for training; an optional FLOP budget per
round bounds the local steps.

Policy `adapt` walks, in this order, until a setting fits: the requested setting; a smaller batch
(halving, down to 2); a smaller rank (halving, down to 1; only where the aggregation accepts
mixed ranks: lora_mode=exact, or methods without shared factors); then a cheaper method
(CHEAPER below) with the same batch walk. Policy `strict` tries only the requested setting.

A client may request its own method (a fleet file's `method` per group or client), or `auto`:
at the requested batch, the methods of `method_order` (most expressive first) at the requested
rank; then the same at each halved batch. The first setting that fits wins: a device keeps its
batch and gives up expressiveness first.

With a round deadline (`round_deadline_s` > 0), `auto` also asks each setting to *finish in time*:
download + local steps + upload, predicted with the virtual clock's own timing
(fedpeft.fleet.clock.client_timing) under this round's compute fraction and jitter, the profile's
payload size for both transfers (GaLore's factored upload is smaller: the estimate is on the safe
side) and the client's partition size for the steps. The first setting that fits memory and the
deadline wins; when none meets the deadline, the one predicted fastest among those that fit memory
(it may still be cut: a straggler under `drop`, fewer steps under `partial`). Client and server run
this same walk with the same inputs (`RoundTiming`), so the server's prediction of the form a client
needs is the client's choice. A requested method under `adapt` does not weigh the deadline: there a
late client is a straggler, as before (tests/test_virtual_clock.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from fedpeft.devices import Device
from fedpeft.fleet.clock import client_timing
from fedpeft.fleet.config import AUTO, RunConfig
from fedpeft.profiling import StepCost, profile_step

#: the next cheaper method to fall back to
CHEAPER = {"fft": "lora", "galore": "lora", "dora": "lora", "taskedge_lora": "taskedge", "lora": "bn_head",
           "taskedge": "bn_head"}
MIN_BATCH = 2  # BatchNorm in train mode cannot normalise a batch of one
RANKED = ("lora", "dora", "galore", "taskedge_lora")
TRAINS_BN_STATS = ("fft", "bn_head")  # their adapters' trains_bn_stats: a trailing batch of one is skipped


@dataclass
class Setting:
    method: str
    rank: int | None
    batch_size: int
    cost: StepCost | None
    status: str  # "ok" | "over_budget"
    adapted: bool
    max_steps: int | None
    reason: str = ""
    predicted_s: float | None = None  # the round's predicted simulated seconds (auto with a deadline)

    def describe(self) -> str:
        rank = f" r={self.rank}" if self.rank else ""
        return f"{self.method}{rank} batch={self.batch_size}"


@dataclass(frozen=True)
class RoundTiming:
    """What a deadline-aware walk needs about this client-round: the deadline (simulated seconds),
    the client's examples, and this round's compute fraction and jitter (the virtual clock's)."""

    deadline_s: float
    examples: int
    compute_fraction: float = 1.0
    jitter: float = 1.0


def round_timing(cfg: RunConfig, examples: int, compute_fraction: float = 1.0, jitter: float = 1.0) -> RoundTiming | None:
    """The walk's timing inputs, or None when the run has no deadline."""
    return RoundTiming(cfg.round_deadline_s, int(examples), compute_fraction, jitter) if cfg.round_deadline_s > 0 else None


def predicted_round_s(cfg: RunConfig, device: Device, method: str, batch: int, cost: StepCost, timing: RoundTiming,
                      max_steps: int | None = None) -> float:
    """Simulated seconds of one client-round of this setting: download, steps, upload."""
    from fedpeft.train import usable_batches

    steps = cfg.local_epochs * usable_batches(timing.examples, batch, method in TRAINS_BN_STATS)
    if max_steps is not None:
        steps = min(steps, max_steps)
    return client_timing(device, cost.total_flops, steps, cost.payload_bytes, cost.payload_bytes,
                         compute_fraction=timing.compute_fraction, jitter=timing.jitter,
                         traffic_per_step=cost.traffic).total_s  # the roofline, as the clock settles


def _halvings(start: int, low: int) -> list[int]:
    values = [start]
    while values[-1] // 2 >= low:
        values.append(values[-1] // 2)
    return values


def _walk(cfg: RunConfig, requested: str) -> list[str]:
    """The methods a client requesting `requested` tries, in order."""
    if requested == "auto":
        return cfg.auto_order()
    methods = [requested]
    while cfg.budget_policy == "adapt" and CHEAPER.get(methods[-1]) is not None:
        methods.append(CHEAPER[methods[-1]])
    return methods


def candidates(cfg: RunConfig, requested: str | None = None, rank: int | None = None):
    """(method, rank, batch) in the documented order, for a client requesting `requested` at
    `rank` (default: the run's method and rank)."""
    requested, base_rank = requested or cfg.method, rank or cfg.rank
    if requested == "auto":
        for batch in _halvings(cfg.batch_size, MIN_BATCH):
            for method in cfg.auto_order():
                yield method, base_rank if method in RANKED else None, batch
        return
    for method in _walk(cfg, requested):
        # GaLore's rank is local (its delta is dense); weight-space aggregation takes any rank; LoRA
        # pairs of other ranks are aggregated only by lora_mode=exact, which re-factors per client.
        mixed_ranks_ok = method != cfg.method or method == "galore" or (
            cfg.lora_mode == "exact" and method in ("lora", "dora"))
        ranks = _halvings(base_rank, 1) if method in RANKED and mixed_ranks_ok else [base_rank if method in RANKED else None]
        for rank in ranks:
            for batch in _halvings(cfg.batch_size, MIN_BATCH):
                yield method, rank, batch
        if cfg.budget_policy == "strict" and requested != "auto":
            return


def all_candidates(cfg: RunConfig) -> set:
    """Every (method, rank, batch) some client of the run may choose: the run's walk and that of
    every method a fleet entry requests."""
    from fedpeft.fleet.setup import fleet_requests

    out = set(candidates(cfg))
    for requested, rank in fleet_requests(cfg):
        out |= set(candidates(cfg, requested, rank))
    return out


def step_cost(cfg: RunConfig, method: str, rank: int | None, batch: int, num_classes: int) -> StepCost:
    return profile_step(cfg.model, method, cfg.method_hparams(method, rank), input_size=cfg.input_size,
                        batch_size=batch, num_classes=num_classes, cache_dir=cfg.cache_dir or None)


def choose_setting(cfg: RunConfig, device: Device, num_classes: int, requested: str | None = None,
                   rank: int | None = None, timing: RoundTiming | None = None) -> Setting:
    """The first candidate setting that fits `device`'s budget (over_budget if none does). `timing`
    (auto only): the setting must also be predicted to finish within the round's deadline."""
    first = None
    fastest = None  # auto with a deadline: the quickest setting that fits memory, should none be on time
    on_clock = timing is not None and (requested or cfg.method) == AUTO
    for method, rank, batch in candidates(cfg, requested, rank):
        cost = step_cost(cfg, method, rank, batch, num_classes)
        max_steps = None
        if cfg.max_flops_per_round > 0:
            max_steps = int(cfg.max_flops_per_round // max(cost.total_flops, 1))
        fits_memory = cost.peak_bytes <= device.ram_train_bytes
        fits_flops = max_steps is None or max_steps >= 1
        setting = Setting(method, rank, batch, cost, "ok", first is not None, max_steps)
        if first is None:
            first = setting
        if fits_memory and fits_flops and on_clock:
            setting.predicted_s = predicted_round_s(cfg, device, method, batch, cost, timing, max_steps)
            if setting.predicted_s <= timing.deadline_s:
                return setting
            if fastest is None or setting.predicted_s < fastest.predicted_s:
                fastest = setting
            continue
        if fits_memory and fits_flops:
            return setting
        if cfg.budget_policy == "strict" and (requested or cfg.method) != AUTO:
            break
    if fastest is not None:
        fastest.reason = f"no setting finishes within the {timing.deadline_s:g} s deadline; the fastest that fits memory"
        return fastest
    reason = (f"needs {first.cost.peak_bytes:,} B of memory, device has {device.ram_train_bytes:,} B"
              if first.cost.peak_bytes > device.ram_train_bytes else
              f"one step needs {first.cost.total_flops:,} FLOPs, budget is {cfg.max_flops_per_round:,.0f}")
    return Setting(first.method, first.rank, first.batch_size, first.cost, "over_budget", False, 0, reason)
