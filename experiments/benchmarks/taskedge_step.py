"""TaskEdge's training step against LoRA's and bn_head's: time, backward FLOPs, peak memory.

    .venv/bin/python experiments/benchmarks/taskedge_step.py [--models mobilenet_v2 resnet18]
        [--batch-size 32] [--input-size 32] [--repeats 7] [--out runs/benchmarks/taskedge_step.json]

For each model (random init, random 32x32 images, 10 classes), each method is attached with its
default hyper-parameters (TaskEdge: density 0.1%, calibrated on the batch; LoRA: its default
rank) and its own optimizer. After one warm-up step each, the methods' steps (forward, loss,
backward, optimizer step, as fedpeft.train runs them) are timed side by side: every repeat runs
one step of each method in turn, so a change in the machine's load hits all of them alike.
torch runs on one thread (`torch.set_num_threads(1)`) and each step is timed by the thread's CPU
time (`time.thread_time`, robust to other jobs on a shared machine) and by wall time; the
medians over the repeats are printed.

Then the profiler (`fedpeft.profiling.profile_step`, exact FLOP convention, uncached) gives each
method's backward FLOPs and peak memory (MemTracker), and the script prints the ratios
taskedge / lora, against the issue's targets: backward FLOPs <= 1.2x, peak memory <= 1.0x.
fft's backward is printed for reference (TaskEdge used to cost as much). Exit code 1 when a
target is missed (`--no-verdict` to only report).
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import fedpeft  # noqa: E402,F401  (torchvision shim first)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fedpeft.methods import make_method  # noqa: E402
from fedpeft.models import build_model  # noqa: E402
from fedpeft.profiling import profile_step  # noqa: E402

METHODS = ("taskedge", "lora", "bn_head")
FLOPS_TARGET = 1.2  # TaskEdge backward FLOPs / LoRA's
MEMORY_TARGET = 1.0  # TaskEdge peak memory / LoRA's


def timed_steps(model_name: str, batch: int, size: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median per-step thread CPU time and wall time of each method, measured in turn."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    base = build_model(model_name, num_classes=10, input_size=size, seed=0)
    runs = {}
    for method in METHODS:
        adapter = make_method(method).attach(copy.deepcopy(base), calibration=x)
        adapter.train_mode()
        runs[method] = (adapter.model, adapter.optimizer(lr=1e-3))

    def step(model, optimizer):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for model, optimizer in runs.values():
        step(model, optimizer)  # warm-up: optimizer state, allocator, kernels
    cpu = {m: [] for m in METHODS}
    wall = {m: [] for m in METHODS}
    for _ in range(repeats):
        for method, (model, optimizer) in runs.items():
            c0, w0 = time.thread_time(), time.perf_counter()
            step(model, optimizer)
            cpu[method].append(time.thread_time() - c0)
            wall[method].append(time.perf_counter() - w0)
    return {m: {"cpu_s": statistics.median(cpu[m]), "wall_s": statistics.median(wall[m])} for m in METHODS}


def profiled(model_name: str, batch: int, size: int) -> dict[str, dict[str, int]]:
    out = {}
    for method in (*METHODS, "fft"):
        cost = profile_step(model_name, method, input_size=size, batch_size=batch, num_classes=10, use_cache=False)
        out[method] = {"backward_flops": int(cost.flops["backward"]), "peak_bytes": cost.peak_bytes,
                       "realised_density": cost.realised_density}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet18"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(REPO / "runs" / "benchmarks" / "taskedge_step.json"))
    parser.add_argument("--no-verdict", action="store_true", help="report only; exit 0 even when a target is missed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    results, missed = {}, []
    for model_name in args.models:
        times = timed_steps(model_name, args.batch_size, args.input_size, args.repeats)
        costs = profiled(model_name, args.batch_size, args.input_size)
        te, lora = costs["taskedge"], costs["lora"]
        ratios = {"backward_flops": te["backward_flops"] / lora["backward_flops"],
                  "peak_bytes": te["peak_bytes"] / lora["peak_bytes"]}
        results[model_name] = {"step_time": times, "profile": costs, "taskedge_over_lora": ratios}
        print(f"\n{model_name}, batch {args.batch_size}, {args.input_size}x{args.input_size}, "
              f"1 thread, median of {args.repeats} steps (TaskEdge realised density {te['realised_density']:.5f})")
        print(f"{'method':>9} | {'cpu ms/step':>11} | {'wall ms/step':>12} | {'backward GFLOPs':>15} | {'peak MiB':>8}")
        for method in (*METHODS, "fft"):
            t = times.get(method)
            cpu_ms = f"{t['cpu_s'] * 1e3:11.1f}" if t else f"{'-':>11}"
            wall_ms = f"{t['wall_s'] * 1e3:12.1f}" if t else f"{'-':>12}"
            c = costs[method]
            print(f"{method:>9} | {cpu_ms} | {wall_ms} | {c['backward_flops'] / 1e9:15.4f} | {c['peak_bytes'] / 2**20:8.2f}")
        print("taskedge / lora:  cpu time {:.3f}x  wall {:.3f}x  backward FLOPs {:.3f}x (target <= {})  "
              "peak memory {:.3f}x (target <= {})".format(
                  times["taskedge"]["cpu_s"] / times["lora"]["cpu_s"], times["taskedge"]["wall_s"] / times["lora"]["wall_s"],
                  ratios["backward_flops"], FLOPS_TARGET, ratios["peak_bytes"], MEMORY_TARGET))
        print("taskedge / bn_head: cpu time {:.3f}x; taskedge backward / fft's: {:.3f}x".format(
            times["taskedge"]["cpu_s"] / times["bn_head"]["cpu_s"], te["backward_flops"] / costs["fft"]["backward_flops"]))
        if ratios["backward_flops"] > FLOPS_TARGET:
            missed.append(f"{model_name}: backward FLOPs {ratios['backward_flops']:.3f}x LoRA's")
        if ratios["peak_bytes"] > MEMORY_TARGET:
            missed.append(f"{model_name}: peak memory {ratios['peak_bytes']:.3f}x LoRA's")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "args": vars(args),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1},
        "results": results, "missed": missed}, indent=2))
    print(f"\nwrote {out}")
    if missed:
        print("targets missed: " + "; ".join(missed))
        return 0 if args.no_verdict else 1
    print("all targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
