"""`compare`: one row per method from their run directories, written as compare.csv, compare.json,
compare.png and compare_curves.png. The to-target columns use one target for all runs."""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from pathlib import Path

from fedpeft.errors import UsageError
from fedpeft.paths import atomic_write_bytes
from fedpeft.report.plots import plot_compare, plot_curves
from fedpeft.fleet.answers import DEFAULT_TARGET_SHARE
from fedpeft.report.summary import read_jsonl, run_answers, summarize

COMPARE_FIELDS = ("method", "final_accuracy", "initial_accuracy", "bytes_up", "bytes_down", "total_flops",
                  "peak_memory_max_bytes", "device_time_s", "energy_j", "clients_over_budget",
                  "bytes_up_vs_fft", "rounds", "model", "run_dir",
                  # the virtual clock's answers (fedpeft.fleet.answers)
                  "clients_straggler", "clients_dropped_out", "sim_time_s", "target_accuracy", "round_to_target",
                  "time_to_target_s", "energy_to_target_j", "bytes_to_target", "wasted_energy_j", "wasted_bytes")


def _positive(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 else None


def _clock_fields(s: dict) -> dict:
    """A run's virtual-clock answers as flat compare columns (to-target ones None if never reached)."""
    reached, wasted = s.get("to_target") or {}, s.get("wasted") or {}
    counts = s.get("status_counts", {})
    return {"clients_straggler": counts.get("straggler", 0), "clients_dropped_out": counts.get("dropped_out", 0),
            "sim_time_s": s.get("sim_time_s"), "target_accuracy": s.get("target_accuracy"),
            "round_to_target": reached.get("round"), "time_to_target_s": reached.get("sim_time_s"),
            "energy_to_target_j": reached.get("energy_j"), "bytes_to_target": reached.get("bytes"),
            "wasted_energy_j": wasted.get("energy_j"), "wasted_bytes": wasted.get("bytes")}


def _fft_name(rows: list[dict]) -> str | None:
    names = [r["method"] for r in rows]
    if "fft" in names:
        return "fft"
    by_config = [r["method"] for r in rows if r.get("config_method") == "fft"]
    return by_config[0] if len(by_config) == 1 else None


def compare(run_dirs: Mapping[str, str | Path], out_dir: str | Path) -> list[dict]:
    """One row per method (name -> run directory); writes compare.csv, compare.json, compare.png."""
    if not run_dirs:
        raise UsageError("compare: no runs given (expected one run directory per method)")
    rows, curves, summaries = [], {}, {}
    for name, run_dir in run_dirs.items():
        s = summaries[str(name)] = summarize(run_dir)
        rows.append({"method": str(name), "final_accuracy": s["final_accuracy"],
                     "initial_accuracy": s["initial_accuracy"], "bytes_up": s["bytes_up"],
                     "bytes_down": s["bytes_down"], "total_flops": s["total_flops"],
                     "peak_memory_max_bytes": s["peak_memory_max_bytes"], "device_time_s": s["device_time_s"],
                     "energy_j": s["energy_j"], "clients_over_budget": s["status_counts"].get("over_budget", 0),
                     "bytes_up_vs_fft": None, "rounds": s["rounds"], "model": s["model"],
                     "run_dir": str(run_dir), "config_method": s["method"]})  # clock columns: below
        curves[str(name)] = s["per_round"]
    # One target for every run, so the to-target columns compare: the configured one, else 95% of the
    # lowest best accuracy among the runs (a level every run reached).
    configured = {_positive(summaries[n]["config"].get("target_accuracy")) for n in summaries}
    bests = [s["best_accuracy"] for s in summaries.values() if s["best_accuracy"] is not None]
    common = configured.pop() if len(configured) == 1 and None not in configured else (
        DEFAULT_TARGET_SHARE * min(bests) if bests else None)
    for r in rows:
        s = summaries[r["method"]]
        clients = read_jsonl(Path(r["run_dir"]) / "clients.jsonl") if (Path(r["run_dir"]) / "clients.jsonl").is_file() else []
        r.update(_clock_fields({**s, **run_answers(s["per_round"], clients, common)}))
    ref = _fft_name(rows)
    if ref is not None:
        fft_up = next(r["bytes_up"] for r in rows if r["method"] == ref)
        for r in rows:
            r["bytes_up_vs_fft"] = r["bytes_up"] / fft_up if fft_up else None
    for r in rows:
        r.pop("config_method")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COMPARE_FIELDS), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r[k] is None else r[k] for k in COMPARE_FIELDS})
    atomic_write_bytes(out_dir / "compare.csv", buf.getvalue().encode())
    atomic_write_bytes(out_dir / "compare.json", (json.dumps(rows, indent=2) + "\n").encode())
    plot_compare(rows, out_dir / "compare.png")
    plot_curves(curves, out_dir / "compare_curves.png")
    return rows


