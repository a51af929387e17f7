"""Budgets: before training, a client looks up the cost of one step (cached profile) and checks it
against its device. Memory budget = the device's RAM for training; an optional FLOP budget per
round bounds the local steps.

Policy `adapt` walks, in this order, until a setting fits: the requested setting; a smaller batch
(halving, down to 2); a smaller rank (halving, down to 1; only where the aggregation accepts
mixed ranks: lora_mode=exact, or methods without shared factors); then a cheaper method
(CHEAPER below) with the same batch walk. Policy `strict` tries only the requested setting.
"""
from __future__ import annotations

from dataclasses import dataclass

from fedpeft.devices import Device
from fedpeft.fleet.config import RunConfig
from fedpeft.profiling import StepCost, profile_step

#: the next cheaper method to fall back to
CHEAPER = {"fft": "lora", "galore": "lora", "dora": "lora", "taskedge_lora": "taskedge", "lora": "bn_head",
           "taskedge": "bn_head"}
MIN_BATCH = 2  # BatchNorm in train mode cannot normalise a batch of one
RANKED = ("lora", "dora", "galore", "taskedge_lora")


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

    def describe(self) -> str:
        rank = f" r={self.rank}" if self.rank else ""
        return f"{self.method}{rank} batch={self.batch_size}"


def _halvings(start: int, low: int) -> list[int]:
    values = [start]
    while values[-1] // 2 >= low:
        values.append(values[-1] // 2)
    return values


def candidates(cfg: RunConfig):
    """(method, rank, batch) in the documented order."""
    method = cfg.method
    while method is not None:
        # A fallback method is not aggregated, and GaLore's rank is local (its delta is dense); LoRA
        # pairs of other ranks are aggregated only by lora_mode=exact, which re-factors per client.
        mixed_ranks_ok = method != cfg.method or method == "galore" or (
            cfg.lora_mode == "exact" and method in ("lora", "dora"))
        ranks = _halvings(cfg.rank, 1) if method in RANKED and mixed_ranks_ok else [cfg.rank if method in RANKED else None]
        for rank in ranks:
            for batch in _halvings(cfg.batch_size, MIN_BATCH):
                yield method, rank, batch
        if cfg.budget_policy == "strict":
            return
        method = CHEAPER.get(method)


def step_cost(cfg: RunConfig, method: str, rank: int | None, batch: int, num_classes: int) -> StepCost:
    return profile_step(cfg.model, method, cfg.method_hparams(method, rank), input_size=cfg.input_size,
                        batch_size=batch, num_classes=num_classes, cache_dir=cfg.cache_dir or None)


def choose_setting(cfg: RunConfig, device: Device, num_classes: int) -> Setting:
    first = None
    for method, rank, batch in candidates(cfg):
        cost = step_cost(cfg, method, rank, batch, num_classes)
        max_steps = None
        if cfg.max_flops_per_round > 0:
            max_steps = int(cfg.max_flops_per_round // max(cost.total_flops, 1))
        fits_memory = cost.peak_bytes <= device.ram_train_bytes
        fits_flops = max_steps is None or max_steps >= 1
        setting = Setting(method, rank, batch, cost, "ok", first is not None, max_steps)
        if first is None:
            first = setting
        if fits_memory and fits_flops:
            return setting
        if cfg.budget_policy == "strict":
            break
    reason = (f"needs {first.cost.peak_bytes:,} B of memory, device has {device.ram_train_bytes:,} B"
              if first.cost.peak_bytes > device.ram_train_bytes else
              f"one step needs {first.cost.total_flops:,} FLOPs, budget is {cfg.max_flops_per_round:,.0f}")
    return Setting(cfg.method, first.rank, first.batch_size, first.cost, "over_budget", False, 0, reason)
