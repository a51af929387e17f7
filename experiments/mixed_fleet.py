"""The same mixed fleet aggregated two ways: every update in weight space, or the run's method only.

    .venv/bin/python experiments/mixed_fleet.py [--rounds 5] [--out experiments/results/mixed_fleet]

The demo's task (mobilenet_v2 pre-trained on clean digits, adapted to impulse-noise digits) with
LoRA on `experiments/fleets/mixed_fallback.toml`: six boards run LoRA, four fall back to BN+H under
their budget. `mixed_aggregation = weight_space` aggregates the BN+H updates with the LoRA ones
(strategies/weight_space.py); `same_method_only` drops them (what fedpeft did before). Writes
results.csv, results.json and summary.md under --out (run directories under --out/runs, ignored
by git).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedpeft.fleet.config import LEGACY_PRETRAINING, RunConfig  # noqa: E402
from fedpeft.report import read_jsonl  # noqa: E402

#: (label, mixed_aggregation, weight_space_bn_stats)
MODES = (("weight_space", "weight_space", True), ("weight_space, BN statistics kept", "weight_space", False),
         ("same_method_only", "same_method_only", True))
FIELDS = ("mixed_aggregation", "final_accuracy", "initial_accuracy", "bytes_up", "bytes_down", "client_rounds_trained",
          "client_rounds_aggregated", "bn_head_client_rounds", "wall_s")


def run(label: str, mode: str, bn_stats: bool, rounds: int, out: Path) -> dict:
    from fedpeft.fleet.simulation import run_fleet

    cfg = RunConfig(method="lora", rounds=rounds, num_clients=10, fleet=str(REPO / "experiments/fleets/mixed_fallback.toml"),
                    trace="off", mixed_aggregation=mode, weight_space_bn_stats=bn_stats, **LEGACY_PRETRAINING,
                    out=str(out / "runs" / label.replace(", ", "-").replace(" ", "_")), overwrite=True)
    start = time.perf_counter()
    summary = run_fleet(cfg)
    lines = [c for c in read_jsonl(Path(cfg.out) / "clients.jsonl") if c["round"] >= 1]
    return {"mixed_aggregation": label, "final_accuracy": summary["final_accuracy"],
            "initial_accuracy": summary["initial_accuracy"], "bytes_up": summary["bytes_up"],
            "bytes_down": summary["bytes_down"], "client_rounds_trained": sum(c["status"] == "ok" for c in lines),
            "client_rounds_aggregated": sum(bool(c.get("aggregated")) for c in lines),
            "bn_head_client_rounds": sum(c["method"] == "bn_head" for c in lines),
            "wall_s": round(time.perf_counter() - start, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="experiments/results/mixed_fleet")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (label, mode, bn_stats) in enumerate(MODES, 1):
        print(f"[{i}/{len(MODES)}] {label}", file=sys.stderr)
        rows.append(run(label, mode, bn_stats, args.rounds, out))
    with open(out / "results.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    table = ["| mixed_aggregation | final accuracy | uplink | downlink | client-rounds aggregated / trained |",
             "|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['mixed_aggregation']} | {r['initial_accuracy']:.4f} -> {r['final_accuracy']:.4f} | "
                     f"{r['bytes_up'] / 2**20:.2f} MiB | {r['bytes_down'] / 2**20:.2f} MiB | "
                     f"{r['client_rounds_aggregated']} / {r['client_rounds_trained']} |")
    summary = (f"# Mixed fleet: weight space vs same method only\n\n`.venv/bin/python experiments/mixed_fleet.py "
               f"--rounds {args.rounds}`; {sum(r['bn_head_client_rounds'] for r in rows) // len(rows)} of the "
               f"client-rounds of each run fell back to BN+H.\n\n" + "\n".join(table) + "\n")
    (out / "summary.md").write_text(summary)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
