"""What one training step of (model, method) costs: memory by category, FLOPs, payload.

    from fedpeft.profiling import profile_step
    cost = profile_step("mobilenet_v2", "lora", {"rank": 4}, input_size=32, batch_size=8, num_classes=10)
    cost.memory["peak_bytes"], cost.flops["total"], cost.to_dict()

The profile runs the method's real training step on random data (its adapter, its optimizer,
GaLore's projector included): one warm-up step so the optimizer state exists, one step under
torch's MemTracker (memory.py), one under FlopCounterMode (flops.py), one under
TrafficMode (traffic.py: bytes each aten op moves, for the roofline). Results are cached
(cache.py): a repeated query returns from an in-memory dict, or from a JSON file on disk.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import fedpeft  # noqa: F401  (torchvision shim before torchvision/peft)
import torch

from fedpeft.errors import UsageError, choice, require
from fedpeft.profiling.cache import ProfileCache, cache_key, default_cache_dir, get_cache
from fedpeft.profiling.flops import CONVENTIONS, count_step_flops
from fedpeft.profiling.memory import CATEGORIES, measure_step_memory
from fedpeft.profiling.traffic import count_step_traffic

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CONTRACT_KEYS = ("model", "method", "params_total", "params_trainable", "payload_bytes", "memory", "flops")


@dataclass(frozen=True)
class StepCost:
    """The cost of one training step. `to_dict()` is the `fedpeft profile --format json` object."""

    model: str
    method: str
    params_total: int
    params_trainable: int
    payload_bytes: int
    memory: dict  # peak_bytes, by_category{7}, category_max{7}, category_max_sum
    flops: dict  # forward, backward, optimizer, total (the chosen convention)
    convention: str = "exact"
    hparams: dict = field(default_factory=dict)
    input_size: int = 0
    batch_size: int = 0
    num_classes: int = 0
    dtype: str = "float32"
    flops_by_convention: dict = field(default_factory=dict)
    flops_detail: dict = field(default_factory=dict)
    profile_seconds: float = 0.0
    torch_version: str = ""
    cached: bool = False
    realised_density: float | None = None  # TaskEdge: the mask's true share of its target weights
    traffic: dict = field(default_factory=dict)  # bytes moved: forward, backward, optimizer, total (+ buckets)
    device: str = "cpu"  # where the step ran (memory is that device's: CUDA rounds blocks to 512 B)

    @property
    def peak_bytes(self) -> int:
        return int(self.memory["peak_bytes"])

    @property
    def total_flops(self) -> int:
        return int(self.flops["total"])

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "method": self.method,
            "params_total": self.params_total,
            "params_trainable": self.params_trainable,
            "payload_bytes": self.payload_bytes,
            "memory": copy.deepcopy(self.memory),
            "flops": dict(self.flops),
            "flop_convention": self.convention,
            "flops_by_convention": copy.deepcopy(self.flops_by_convention),
            "hparams": dict(self.hparams),
            "input_size": self.input_size,
            "batch_size": self.batch_size,
            "num_classes": self.num_classes,
            "dtype": self.dtype,
            "torch_version": self.torch_version,
            "profile_seconds": self.profile_seconds,
            "cached": self.cached,
            **({"realised_density": self.realised_density} if self.realised_density is not None else {}),
            "traffic": copy.deepcopy(self.traffic),
            "device": self.device,
        }


# Front of the cache for the fleet's hot path: exact call arguments -> StepCost.
_HITS: dict[tuple, StepCost] = {}

#: how many times a real profile ran in this process (tests use it to prove cache hits)
PROFILE_RUNS = 0


def _freeze(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _declares_float(annotation) -> bool:
    """True for a dataclass field declared `float` or `float | None` (string annotations included)."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = {part.strip() for part in text.replace("Optional[", "").replace("]", "").split("|")}
    return "float" in parts and "int" not in parts


def normalise_hparams(method) -> None:
    """Make int values of float-declared fields floats (alpha=4 and alpha=4.0 are one method).

    Done on the method itself, so the cache key, the record and the profiled model all see
    the same value.
    """
    for f in dataclasses.fields(method):
        value = getattr(method, f.name)
        if isinstance(value, int) and not isinstance(value, bool) and _declares_float(f.type):
            setattr(method, f.name, float(value))


_VERSIONS: dict[str, str] = {}


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose code a profile runs (part of the cache key)."""
    if not _VERSIONS:
        from importlib import metadata

        _VERSIONS["torch"] = torch.__version__
        for dist in ("torchvision", "peft", "galore-torch"):
            try:
                _VERSIONS[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                _VERSIONS[dist] = "absent"
    return dict(_VERSIONS)


def profile_step(
    model_name: str,
    method_name: str,
    hparams: dict | None = None,
    input_size: int = 32,
    batch_size: int = 8,
    num_classes: int = 10,
    *,
    convention: str = "exact",
    dtype: str = "float32",
    cache_dir: str | None = None,
    use_cache: bool = True,
    seed: int = 0,
    device: str = "cpu",
) -> StepCost:
    """Profile (or fetch from the cache) one training step of `method_name` on `model_name`.

    `hparams` are the method's hyper-parameters (e.g. {"rank": 4, "alpha": 4}); ones the method
    lacks or left as None are ignored. `device`: cpu, cuda (an error without CUDA) or auto.
    Bad input raises fedpeft.errors.UsageError.
    """
    from fedpeft.train import resolve_device

    hparams = dict(hparams or {})
    device = resolve_device(device).type
    root = default_cache_dir() if cache_dir is None else cache_dir
    front = None
    if use_cache:
        front = (model_name, method_name, _freeze(hparams), input_size, batch_size, num_classes,
                 convention, dtype, str(root), seed, device)
        try:
            hit = _HITS.get(front)
        except TypeError:  # unhashable hyper-parameter value: skip the front dict
            front, hit = None, None
        if hit is not None:
            return hit

    from fedpeft.methods import METHODS, make_method
    from fedpeft.models import MODELS

    choice("model", model_name, MODELS)
    choice("method", method_name, METHODS)
    choice("flop convention", convention, CONVENTIONS)
    choice("dtype", dtype, DTYPES)
    for name, value, low in (("input_size", input_size, 1), ("batch_size", batch_size, 1), ("num_classes", num_classes, 2)):
        require(isinstance(value, int) and not isinstance(value, bool) and value >= low,
                f"{name}: must be an integer >= {low}, got {value!r}")
    method = make_method(method_name, **hparams)
    normalise_hparams(method)
    full_hparams = method.hparams()
    key_fields = {
        "model": model_name, "hparams": full_hparams, "input_size": input_size, "batch_size": batch_size,
        "num_classes": num_classes, "dtype": dtype, "seed": seed, **library_versions(),
    }
    if device != "cpu":  # a CPU profile keeps the key it had before devices were profiled
        key_fields["device"] = device
    key = cache_key(key_fields)
    cache = get_cache(root) if use_cache else None
    record = cache.get(key) if cache is not None else None
    cached = record is not None
    if record is None:
        record = _profile(model_name, method, input_size, batch_size, num_classes, dtype, seed, device)
        record["key_fields"] = key_fields
        if cache is not None:
            cache.put(key, record)
    cost = _cost_from_record(record, convention, cached)
    if front is not None:
        _HITS[front] = _cost_from_record(record, convention, True)
    return cost


def _cost_from_record(record: dict, convention: str, cached: bool) -> StepCost:
    record = copy.deepcopy(record)  # the cache keeps its own record; callers get their own dicts
    return StepCost(
        model=record["model"], method=record["method"],
        params_total=record["params_total"], params_trainable=record["params_trainable"],
        payload_bytes=record["payload_bytes"], memory=record["memory"],
        flops=record["flops_by_convention"][convention], convention=convention,
        hparams=record["hparams"], input_size=record["input_size"], batch_size=record["batch_size"],
        num_classes=record["num_classes"], dtype=record["dtype"],
        flops_by_convention=record["flops_by_convention"], flops_detail=record.get("flops_detail", {}),
        profile_seconds=record["profile_seconds"], torch_version=record["torch_version"], cached=cached,
        realised_density=record.get("realised_density"), traffic=record.get("traffic", {}),
        device=record.get("device", "cpu"),
    )


def _profile(model_name: str, method, input_size: int, batch_size: int, num_classes: int, dtype: str, seed: int,
             device: str = "cpu") -> dict:
    """Build, attach, and measure: the uncached path. The model is built and the method attached on
    the CPU (same seeds, same mask as a CPU profile), then model and batch move to `device`."""
    global PROFILE_RUNS
    PROFILE_RUNS += 1
    from fedpeft.models import build_model

    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]), _one_thread():
        torch.manual_seed(seed)
        model = build_model(model_name, num_classes=num_classes, input_size=input_size, seed=seed)
        model = model.to(DTYPES[dtype])
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(batch_size, 3, input_size, input_size, generator=gen).to(DTYPES[dtype])
        y = torch.randint(0, num_classes, (batch_size,), generator=gen)
        _check_forward(model, model_name, x)
        adapter = method.attach(model, calibration=x)
        adapter.model.to(device)
        x, y = x.to(device), y.to(device)
        adapter.train_mode()
        _check_forward(adapter.model, model_name, x, train=True)
        optimizer = adapter.optimizer(lr=method.lr)
        memory = measure_step_memory(adapter.model, optimizer, x, y, before_step=adapter.train_mode)
        flops = {}
        detail = {}
        for convention in CONVENTIONS:
            adapter.train_mode()
            counted = count_step_flops(adapter.model, optimizer, x, y, convention=convention)
            flops[convention] = counted.to_dict()
            detail[convention] = counted.detail
        adapter.train_mode()
        traffic = count_step_traffic(adapter.model, optimizer, x, y)
        params_total = sum(p.numel() for p in adapter.model.parameters())
        record = {
            "model": model_name,
            "method": method.name,
            "params_total": int(params_total),
            "params_trainable": int(adapter.num_trainable()),
            "payload_bytes": int(adapter.delta_bytes()),
            "memory": memory.to_dict(),
            "flops_by_convention": flops,
            "flops_detail": detail,
            "traffic": traffic.to_dict(),
            "hparams": {k: v for k, v in method.hparams().items() if k != "method"},
            "input_size": input_size,
            "batch_size": batch_size,
            "num_classes": num_classes,
            "dtype": dtype,
            "torch_version": torch.__version__,
            "device": device,
        }
        if hasattr(adapter, "realised_density"):
            record["realised_density"] = float(adapter.realised_density)
    record["profile_seconds"] = round(time.perf_counter() - started, 3)
    return record


@contextlib.contextmanager
def _one_thread():
    """Profile on one intra-op thread. The step is tiny (batch 8 at 32x32), so threads buy little,
    and on a busy machine torch's spinning worker threads made a profile 30x slower (107 s instead of
    3.6 s wall, measured on the 2-core machine at load ~14). Counts and memory do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check_forward(model: torch.nn.Module, model_name: str, x: torch.Tensor, train: bool = False) -> None:
    """Turn the model's own failure on this input into one clear UsageError."""
    was_training = model.training
    if not train:
        model.eval()
    try:
        with torch.no_grad():
            model(x)
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        size = x.shape[-1]
        if "Expected more than 1 value per channel" in first:
            raise UsageError(
                f"batch_size: {model_name} at input_size {size} trains BatchNorm on a 1x1 feature map, "
                f"which needs batch_size >= 2 (got {x.shape[0]}); use a larger batch or input size"
            ) from None
        raise UsageError(f"input_size: {size} is too small for {model_name} ({first})") from None
    finally:
        model.train(was_training)


__all__ = ["CATEGORIES", "CONTRACT_KEYS", "CONVENTIONS", "ProfileCache", "StepCost", "profile_step"]
