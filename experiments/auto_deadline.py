"""Which method `method = auto` gives each device of the demo's fleet under a round deadline.

    .venv/bin/python experiments/auto_deadline.py [--deadlines 0,4,2] [--cache-dir DIR]

The demo's 10 devices, mobilenet_v2 at 32x32, batch 32, the default method_order: for each deadline
(0: none) each device's choice from fedpeft.fleet.budget.choose_setting, the walk the client and the
server both run, and its predicted round time (download + steps + upload on the virtual clock, at
full speed and without jitter: `trace = off`, `clock_jitter = false`). Profiles only, no training.
tests/test_weight_space.py::test_auto_with_a_deadline_spreads_methods_over_the_default_fleet runs
such a fleet for real.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fedpeft  # noqa: E402,F401  (torchvision shim first)
from fedpeft.fleet import setup  # noqa: E402
from fedpeft.fleet.budget import choose_setting, round_timing  # noqa: E402
from fedpeft.fleet.config import RunConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deadlines", default="0,4,2", help="round deadlines in simulated seconds (0: none)")
    parser.add_argument("--cache-dir", default="", help="profile cache (default: fedpeft's own)")
    args = parser.parse_args()
    deadlines = [float(x) for x in args.deadlines.split(",")]
    base = RunConfig(method="auto", trace="off", clock_jitter=False, cache_dir=args.cache_dir, out="runs/auto_deadline")
    classes = setup.task_for(base).num_classes
    rows = []
    for spec in setup.fleet_for(base):
        examples = len(setup.client_data(base, spec.client_id).labels)
        cells = []
        for deadline in deadlines:
            cfg = RunConfig(**{**base.to_dict(), "round_deadline_s": deadline})
            s = choose_setting(cfg, spec.device, classes, timing=round_timing(cfg, examples))
            late = " (late)" if s.reason else ""
            cells.append(f"{s.method} b{s.batch_size}" + (f" {s.predicted_s:.2f} s{late}" if s.predicted_s else ""))
        rows.append([str(spec.client_id), spec.device.name, *cells])
    headers = ["client", "device", *[f"deadline {d:g} s" if d else "no deadline" for d in deadlines]]
    print("| " + " | ".join(headers) + " |\n|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
