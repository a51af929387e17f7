"""How long `fedpeft` takes to answer (issue 11 item 7, "Fast start").

    .venv/bin/python experiments/benchmarks/cli_start.py            # 5 runs per light command, 3 cold profiles
    .venv/bin/python experiments/benchmarks/cli_start.py --runs 3 --profile-runs 1

Each command runs as a fresh subprocess (`python -m fedpeft ...`, the venv's interpreter), several
times; the table gives the median wall time, the median CPU time of the child (user + sys, which
depends far less on how busy the machine is), and median wall / target. Targets: 1.5 s for
`--help`, `devices`, every subcommand's `--help` and bad-input errors; 5 s for a cold `fedpeft
profile` of mobilenet_v2 / lora at 32x32 (a fresh, empty cache directory each run); 0.5 s for a
cached profile lookup inside a process (`profile_step` after the libraries are loaded: the first
lookup reads the JSON cache on disk, the repeat hits the in-memory front). Exit code 1 when a
median misses its target.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

LIGHT_TARGET_S, PROFILE_TARGET_S, LOOKUP_TARGET_S = 1.5, 5.0, 0.5
COMMANDS = ("compare", "demo", "devices", "finetune", "pretrain", "profile", "simulate")
LIGHT = [
    ("fedpeft --help", ["--help"], 0),
    ("fedpeft devices", ["devices"], 0),
    *[(f"fedpeft {c} --help", [c, "--help"], 0) for c in COMMANDS],
    ("bad: finetune --rank 0", ["finetune", "--rank", "0"], 2),
    ("bad: finetune --model vgg", ["finetune", "--model", "vgg"], 2),
    ("bad: profile --method nope", ["profile", "--method", "nope"], 2),
    ("bad: simulate --lora-mode mean", ["simulate", "--lora-mode", "mean"], 2),
    ("bad: simulate --clients-per-round 500", ["simulate", "--num-clients", "200", "--clients-per-round", "500"], 2),
    ("bad: simulate --set colour=red", ["simulate", "--set", "colour=red"], 2),
]
LOOKUP = """
import json, sys, time
import torch
from fedpeft.profiling import _HITS, profile_step
from fedpeft.profiling.cache import get_cache
root = sys.argv[1]
profile_step("mobilenet_v2", "lora", {}, cache_dir=root)  # make sure the disk cache holds it
_HITS.clear(); get_cache(root).clear_memory()
t = time.perf_counter(); first = profile_step("mobilenet_v2", "lora", {}, cache_dir=root); disk = time.perf_counter() - t
t = time.perf_counter(); profile_step("mobilenet_v2", "lora", {}, cache_dir=root); again = time.perf_counter() - t
assert first.cached
print(json.dumps({"disk": disk, "memory": again}))
"""


def timed(argv: list[str], expect: int, cwd: str) -> tuple[float, float]:
    """(wall s, child CPU s) of one `python -m fedpeft argv` run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fedpeft", *argv], capture_output=True, text=True, cwd=cwd)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != expect:
        raise SystemExit(f"fedpeft {' '.join(argv)}: exit {proc.returncode}, expected {expect}\n{proc.stderr}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def row(name: str, samples: list[tuple[float, float]], target: float) -> tuple[str, bool]:
    wall = statistics.median(s[0] for s in samples)
    cpu = statistics.median(s[1] for s in samples)
    ok = wall < target
    return (f"{name:<40} {wall:8.2f} {cpu:8.2f} {target:7.1f} {wall / target:7.2f}x  {'ok' if ok else 'MISSED'}", ok)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per light command (default 5)")
    ap.add_argument("--profile-runs", type=int, default=3, help="cold profile runs (default 3)")
    args = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(f"{'command':<40} {'wall s':>8} {'cpu s':>8} {'target':>7} {'ratio':>8}  (medians of subprocess runs)")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, argv, expect in LIGHT:
            line, ok = row(name, [timed(argv, expect, tmp) for _ in range(args.runs)], LIGHT_TARGET_S)
            print(line, flush=True)
            results.append(ok)
        samples = []
        for i in range(args.profile_runs):
            cache = os.path.join(tmp, f"cold-{i}")
            samples.append(timed(["profile", "--model", "mobilenet_v2", "--method", "lora", "--cache-dir", cache],
                                 0, tmp))
        line, ok = row("cold: profile mobilenet_v2 lora 32x32", samples, PROFILE_TARGET_S)
        print(line, flush=True)
        results.append(ok)
        proc = subprocess.run([sys.executable, "-c", LOOKUP, os.path.join(tmp, "lookup")], capture_output=True,
                              text=True, cwd=root, check=True)
        lookup = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
        for what, key in (("in-process lookup, disk cache", "disk"), ("in-process lookup, repeat", "memory")):
            ok = lookup[key] < LOOKUP_TARGET_S
            print(f"{what:<40} {lookup[key]:8.4f} {'':>8} {LOOKUP_TARGET_S:7.1f} {lookup[key] / LOOKUP_TARGET_S:7.3f}x  "
                  f"{'ok' if ok else 'MISSED'}")
            results.append(ok)
    load = os.getloadavg()
    print(f"\nload average during the run: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} cores "
          "(wall times grow with load; cpu s much less)")
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
