"""Poisoned clients against each aggregation rule: how much accuracy each rule keeps.

    .venv/bin/python experiments/robustness.py --out experiments/results/robustness [--quick]

The demo's fleet (mobilenet_v2 pre-trained on clean digits, 10 mixed devices, LoRA, digits under
impulse noise) runs once clean and once per rule with 2 of the 10 clients poisoned: each uploads
its start + (-10) x its update (sign-flipped, ten-fold), with its true example count (an inflated
count is rejected by the server's examples cap before any rule sees it; tests/test_hostile_replies.py).
Rules: plain FedAvg with no screening (reject_norm_multiple=0), FedAvg with fedpeft's default
screening (reject updates over 10x the others' median norm), coordinate-wise median, trimmed mean
(20% cut at each end), and clipping every update to the round's median norm.
Writes results.csv, results.json and summary.md (with the command that made them); each run's own
directory goes under OUT/runs/.
--quick: 2 rounds instead of 3.
"""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpeft.fleet.config import LEGACY_PRETRAINING, RunConfig  # noqa: E402

POISONED = "3,7"
CASES = {  # name -> (poisoned?, settings)
    "clean": (False, {"reject_norm_multiple": 0.0}),
    "fedavg": (True, {"reject_norm_multiple": 0.0}),
    "fedavg+screen": (True, {}),
    "median": (True, {"aggregator": "median", "reject_norm_multiple": 0.0}),
    "trimmed_mean": (True, {"aggregator": "trimmed_mean", "trim_fraction": 0.2, "reject_norm_multiple": 0.0}),
    "clip": (True, {"clip_median_multiple": 1.0, "reject_norm_multiple": 0.0}),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/robustness", help="output folder (default runs/robustness)")
    p.add_argument("--quick", action="store_true", help="2 rounds instead of 3")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    p.add_argument("--cache-dir", default="", help="checkpoint/profile cache (default $FEDPEFT_CACHE or ~/.cache/fedpeft)")
    return p.parse_args(argv)


def run_case(base: RunConfig, name: str, out: Path) -> dict:
    from fedpeft.fleet.simulation import run_fleet

    poisoned, settings = CASES[name]
    run_dir = out / "runs" / name  # the runs' own logs, kept out of the committed results
    cfg = replace(base, out=str(run_dir), overwrite=True, **settings,
                  **({"poison_clients": POISONED} if poisoned else {}))
    start = time.perf_counter()
    summary = run_fleet(cfg)
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    clients = [json.loads(line) for line in (run_dir / "clients.jsonl").read_text().splitlines()]
    poisoned_ids = {int(c) for c in POISONED.split(",")} if poisoned else set()
    return {"case": name, "poisoned": len(poisoned_ids), "accuracy_start": rounds[0]["accuracy"],
            "accuracy_final": rounds[-1]["accuracy"], "rounds": len(rounds) - 1,
            "poisoned_rejected": sum(c["status"] == "rejected" for c in clients if c["client_id"] in poisoned_ids),
            "honest_rejected": sum(c["status"] == "rejected" for c in clients if c["client_id"] not in poisoned_ids),
            "bytes_up": summary.get("bytes_up_total", sum(c.get("bytes_up", 0) for c in clients)),
            "wall_s": round(time.perf_counter() - start, 1)}


def write(rows: list[dict], out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    clean = next((r["accuracy_final"] for r in rows if r["case"] == "clean"), None)
    lines = ["# Poisoned clients against each aggregation rule", "", f"Command: `{command}`", "",
             "| rule | poisoned clients | accuracy start | accuracy final | vs clean | poisoned rejected | honest rejected |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        gap = f"{100 * (r['accuracy_final'] - clean):+.1f} pts" if clean is not None else "n/a"
        lines.append(f"| {r['case']} | {r['poisoned']} of 10 | {r['accuracy_start']:.4f} | {r['accuracy_final']:.4f} | "
                     f"{gap} | {r['poisoned_rejected']} | {r['honest_rejected']} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    base = RunConfig(rounds=2 if args.quick else 3, cache_dir=args.cache_dir,
                     **LEGACY_PRETRAINING)  # the committed figures' pre-training (fedpeft.pretrain)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"robustness: error: cases: unknown {unknown[0]!r}; allowed: {', '.join(CASES)}", file=sys.stderr)
        return 2
    rows = []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name}", file=sys.stderr)
        rows.append(run_case(base, name, out))
    command = "python experiments/robustness.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    write(rows, out, command.strip())
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
