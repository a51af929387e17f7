"""Predicted vs measured step time: is FLOPs / FLOP/s (or the roofline) a good device-time model?

    .venv/bin/python experiments/benchmarks/step_time.py                 # the whole grid
    .venv/bin/python experiments/benchmarks/step_time.py --models resnet18 --methods fft lora

Times real training steps (forward, backward, optimizer step; the profile's own step) of each
(model, method) at 32x32, batch 32, on this machine, and compares them with two predictions made
from the profile (fedpeft.profiling.profile_step) and two calibrations of this machine:

  F  sustained FLOP/s: a dense 3x3 conv's training step (forward + both gradients), the
     workload a CNN step is mostly made of (a plain GEMM is timed and printed too);
  B  memory bandwidth: a STREAM-like add, c = a + b on 16 MiB arrays (larger than the L2 cache,
     the size class of a step's largest tensors), the result allocated by the op as a training
     step's ops allocate theirs; bytes = 3 arrays. Copy (preallocated) is printed too.

  before (FLOPs only):  total_flops / F
  after  (roofline):    fedpeft.profiling.traffic.roofline_time_s(total_flops, traffic, F, B)
  calibrated:           fedpeft.profiling.kernel_efficiency.calibrated_time_s: the roofline with each
                        op class's work divided by the class's efficiency on this machine, plus a
                        fixed cost per op; both measured by microbenchmarks at generic shapes
                        (measure_kernel_efficiency), never by timing a model's step

Both calibrations run once at the start (printed) and again right before each cell, whose
predictions use its own. Everything is timed on one thread (torch.set_num_threads(1)) with time.thread_time(): CPU time of
this thread only, so other jobs on a shared machine do not count. Each figure is the median of
`--repeats` timings after `--warmup` untimed runs. Prints the error per cell, (predicted -
measured) / measured, before and after, and the mean absolute error; writes a JSON with every
figure to `--out`. Exits 1 when a cell's calibrated error is outside +-`--goal` (default 25%).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import fedpeft  # noqa: E402,F401  (torchvision shim)
import torch  # noqa: E402

from fedpeft.profiling import profile_step  # noqa: E402
from fedpeft.profiling.kernel_efficiency import (calibrated_time_s, measure_kernel_efficiency,  # noqa: E402
                                                 median_thread_time)
from fedpeft.profiling.traffic import op_parts, roofline_time_s  # noqa: E402

MODELS = ("mobilenet_v2", "mobilenet_v3_small", "resnet18", "mobilenet_v2_035")
METHODS = ("fft", "bn_head", "lora", "dora", "galore", "taskedge")


def calibrate_flops(repeats: int) -> dict:
    """Sustained FLOP/s of a dense conv training step and of a GEMM, one thread."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, 16, 16, generator=gen, requires_grad=True)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False)
    conv_flops = 3 * 2 * 32 * 16 * 16 * 64 * 64 * 9  # forward, grad input, grad weight

    def conv_step():
        x.grad = None
        conv.weight.grad = None
        conv(x).sum().backward()

    a, b = torch.randn(512, 512, generator=gen), torch.randn(512, 512, generator=gen)
    gemm_flops = 2 * 512 ** 3
    conv_s = median_thread_time(conv_step, repeats, 3)
    gemm_s = median_thread_time(lambda: torch.mm(a, b), repeats, 3)
    return {"conv_flops_per_s": conv_flops / conv_s, "gemm_flops_per_s": gemm_flops / gemm_s}


def calibrate_bandwidth(repeats: int, mib: int = 16) -> dict:
    """STREAM-like copy and add bandwidth (bytes read + written per second), one thread."""
    n = mib * 2 ** 20 // 4
    a, b, c = torch.rand(n), torch.rand(n), torch.empty(n)  # c: copy's target
    copy_s = median_thread_time(lambda: c.copy_(a), repeats, 3)
    add_s = median_thread_time(lambda: torch.add(a, b), repeats, 3)
    return {"copy_bytes_per_s": 2 * 4 * n / copy_s, "add_bytes_per_s": 3 * 4 * n / add_s, "array_mib": mib}


def build_step(model_name: str, method_name: str, input_size: int, batch_size: int):
    """The profile's training step of (model, method) on random data, as a callable."""
    from fedpeft.methods import make_method
    from fedpeft.models import build_model

    torch.manual_seed(0)
    model = build_model(model_name, num_classes=10, input_size=input_size, seed=0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, input_size, input_size, generator=gen)
    y = torch.randint(0, 10, (batch_size,), generator=gen)
    method = make_method(method_name)
    adapter = method.attach(model, calibration=x)
    adapter.train_mode()
    optimizer = adapter.optimizer(lr=method.lr)

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(adapter.model(x), y).backward()
        optimizer.step()

    return step


def explain(model_name: str, method_name: str, input_size: int, batch_size: int, F: float, B: float,
            kernels: dict) -> None:
    """Where one step's time goes: CPU time of each op (timed one by one under a dispatch mode)
    summed per op class, beside the class's roofline max(flops / F, bytes / B) per op and its
    calibrated time (roofline / the class's efficiency + overhead per op)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fedpeft.profiling.traffic import _NO_TRAFFIC

    class Timed(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.rows: dict[str, list] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            start = time.thread_time()
            out = func(*args, **kwargs)
            spent = time.thread_time() - start
            if func in _NO_TRAFFIC or func.is_view:
                return out
            parts = op_parts(func, args, kwargs, out)  # a conv backward: one per gradient, timed together
            row = self.rows.setdefault(" + ".join(cls for cls, _, _ in parts), [0, 0.0, 0.0, 0.0])
            row[0] += 1
            row[1] += spent
            for cls, flops, moved in parts:
                row[2] += max(flops / F, moved / B)
                row[3] += max(flops / F, moved / B) / kernels["efficiency"][cls] + kernels["overhead_s"][cls]
            return out

    step = build_step(model_name, method_name, input_size, batch_size)
    for _ in range(3):
        step()
    mode = Timed()
    with mode:
        step()
    print(f"where the time goes, {model_name}/{method_name} (one step, each op timed alone):")
    print(f"  {'op class':<44}{'ops':>5}{'measured ms':>13}{'roofline ms':>13}{'ratio':>7}{'calibrated ms':>15}")
    for name, (count, spent, roof, cal) in sorted(mode.rows.items(), key=lambda kv: -kv[1][1]):
        print(f"  {name:<44}{count:>5}{spent * 1e3:>13.1f}{roof * 1e3:>13.1f}{spent / roof if roof else 0:>7.1f}"
              f"{cal * 1e3:>15.1f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per figure (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs before timing")
    parser.add_argument("--goal", type=float, default=0.25, help="largest |error| of the calibrated prediction")
    parser.add_argument("--out", default="runs/benchmarks/step_time.json")
    parser.add_argument("--explain", nargs="*", default=[], metavar="MODEL/METHOD",
                        help="also print where the time of these cells goes, op class by op class")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    flops_cal = calibrate_flops(args.repeats)
    bw_cal = calibrate_bandwidth(args.repeats)
    F, B = flops_cal["conv_flops_per_s"], bw_cal["add_bytes_per_s"]
    print(f"calibration (1 thread, CPU time, median of {args.repeats}): F = {F / 1e9:.2f} GFLOP/s dense conv "
          f"(GEMM {flops_cal['gemm_flops_per_s'] / 1e9:.2f}); B = {B / 1e9:.2f} GB/s add "
          f"(copy {bw_cal['copy_bytes_per_s'] / 1e9:.2f}), ridge {F / B:.1f} FLOP/byte; re-measured before each cell")
    kernels = measure_kernel_efficiency(F, B, args.repeats)
    print("kernel efficiency against these roofs, and fixed cost per kernel call (microbenchmarks, "
          "fedpeft/profiling/kernel_efficiency.py; re-measured before each cell): "
          + ", ".join(f"{c} {e:.3f} {kernels['overhead_s'][c] * 1e6:.1f} us" for c, e in kernels["efficiency"].items()))

    rows = []
    header = f"{'model':<20}{'method':<10}{'GFLOP':>8}{'MB moved':>10}{'measured ms':>13}" \
             f"{'FLOPs-only ms':>15}{'error':>8}{'roofline ms':>13}{'error':>8}{'calibrated ms':>15}{'error':>8}"
    print(header)
    for model_name in args.models:
        for method_name in args.methods:
            cost = profile_step(model_name, method_name, input_size=args.input_size, batch_size=args.batch_size)
            step = build_step(model_name, method_name, args.input_size, args.batch_size)
            # calibrate again right before the cell: a shared machine's load drifts, and it slows the
            # calibration and the step alike only when both run under it
            F, B = calibrate_flops(args.repeats)["conv_flops_per_s"], calibrate_bandwidth(args.repeats)["add_bytes_per_s"]
            kernels = measure_kernel_efficiency(F, B, args.repeats)  # relative to this cell's F and B
            measured = median_thread_time(step, args.repeats, args.warmup)
            before = cost.total_flops / F
            after = roofline_time_s(cost.total_flops, cost.traffic, F, B)
            calibrated = calibrated_time_s(cost.total_flops, cost.traffic, F, B, kernels["efficiency"],
                                           kernels["overhead_s"])
            row = {"model": model_name, "method": method_name, "flops": cost.total_flops, "F": F, "B": B,
                   "traffic_bytes": cost.traffic["total"], "measured_s": measured,
                   "kernels": sum(cost.traffic["class_kernels"].values()),
                   "flops_only_s": before, "roofline_s": after, "calibrated_s": calibrated,
                   "efficiency": kernels["efficiency"], "overhead_s": kernels["overhead_s"],
                   "error_flops_only": (before - measured) / measured, "error_roofline": (after - measured) / measured,
                   "error_calibrated": (calibrated - measured) / measured}
            rows.append(row)
            print(f"{model_name:<20}{method_name:<10}{cost.total_flops / 1e9:>8.3f}{cost.traffic['total'] / 1e6:>10.1f}"
                  f"{measured * 1e3:>13.1f}{before * 1e3:>15.1f}{row['error_flops_only']:>+8.0%}"
                  f"{after * 1e3:>13.1f}{row['error_roofline']:>+8.0%}"
                  f"{calibrated * 1e3:>15.1f}{row['error_calibrated']:>+8.0%}", flush=True)

    print(f"calibration before each cell: F {min(r['F'] for r in rows) / 1e9:.1f}-{max(r['F'] for r in rows) / 1e9:.1f}"
          f" GFLOP/s, B {min(r['B'] for r in rows) / 1e9:.1f}-{max(r['B'] for r in rows) / 1e9:.1f} GB/s")
    mae_before = statistics.mean(abs(r["error_flops_only"]) for r in rows)
    mae_after = statistics.mean(abs(r["error_roofline"]) for r in rows)
    mae_calibrated = statistics.mean(abs(r["error_calibrated"]) for r in rows)
    missed = [f"{r['model']}/{r['method']}" for r in rows if abs(r["error_calibrated"]) > args.goal]

    def within(key):
        return f"{sum(abs(r[key]) <= args.goal for r in rows)}/{len(rows)}"
    print(f"mean |error|: FLOPs only {mae_before:.0%}, roofline {mae_after:.0%}, calibrated {mae_calibrated:.0%}; "
          f"cells within +-{args.goal:.0%}: FLOPs only {within('error_flops_only')}, roofline "
          f"{within('error_roofline')}, calibrated {within('error_calibrated')}")
    if missed:
        print(f"outside the goal (calibrated): {', '.join(missed)}")
    for cell in args.explain:
        model_name, _, method_name = cell.partition("/")
        F, B = calibrate_flops(args.repeats)["conv_flops_per_s"], calibrate_bandwidth(args.repeats)["add_bytes_per_s"]
        explain(model_name, method_name, args.input_size, args.batch_size, F, B, measure_kernel_efficiency(F, B))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
        "threads": 1, "timer": "time.thread_time", "repeats": args.repeats, "warmup": args.warmup,
        "input_size": args.input_size, "batch_size": args.batch_size, "calibration": {**flops_cal, **bw_cal},
        "F": F, "B": B, "kernel_efficiency": kernels, "rows": rows, "mae_flops_only": mae_before,
        "mae_roofline": mae_after, "mae_calibrated": mae_calibrated, "missed": missed,
    }, indent=1))
    print(f"wrote {out}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
