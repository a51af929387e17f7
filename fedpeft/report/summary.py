"""A run's logs read back and summed up: `read_jsonl`, `summarize` (written to summary.json),
`load_summary`. Totals are sums over every client record; peak memory means and maxima are over
clients that trained; the fleet-level answers (time, energy and bytes to a target accuracy, wasted
work) come from fedpeft.fleet.answers."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from fedpeft.errors import UsageError
from fedpeft.fleet.answers import fleet_answers
from fedpeft.paths import atomic_write_bytes
from fedpeft.report.fmt import _as_int_or_none, _flops_total, _int, _isum, _max, _mean, _num, _peak, _status, _sum

log = logging.getLogger("fedpeft.report")

STATUSES = ("ok", "over_budget", "unavailable", "failed", "rejected", "straggler", "dropped_out")
FLOP_KEYS = ("forward", "backward", "optimizer", "total")


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects in `path`, one per line; blank lines are skipped.

    A run killed mid-write can leave its last line cut short: an unparsable final line is skipped
    (with a warning). An unparsable line anywhere else, or a line that is not a JSON object, raises
    UsageError naming the file and the line number.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    lines = raw.split(b"\n")
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    records: list[dict] = []
    for k, (lineno, line) in enumerate(numbered):
        last = k == len(numbered) - 1
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            if last:
                log.warning("%s: skipping line %d, cut short (%s)", path, lineno, exc)
                break
            raise UsageError(f"{path}: line {lineno} is not valid JSON ({exc})") from None
        if not isinstance(record, dict):
            raise UsageError(f"{path}: line {lineno} is a JSON {type(record).__name__}, expected an object")
        records.append(record)
    return records


def _read_optional(path: Path) -> list[dict]:
    return read_jsonl(path) if path.is_file() else []


def _read_config(run_dir: Path) -> dict:
    path = run_dir / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise UsageError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _run_dir(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"run directory {run_dir}: not found (expected the --out of `fedpeft simulate`)")
    return run_dir


def _device_aggregate(records: list[dict]) -> dict:
    ok = [r for r in records if _status(r) == "ok"]
    over = [r for r in records if _status(r) == "over_budget"]
    counts = {s: 0 for s in STATUSES}
    for r in records:
        counts[_status(r)] = counts.get(_status(r), 0) + 1
    ids = {r.get("client_id") for r in records if r.get("client_id") is not None}
    return {
        "clients": len(ids) if ids else len(records),
        "records": len(records),
        **counts,
        "peak_memory_mean_bytes": _as_int_or_none(_mean(_peak(r) for r in ok)),
        "peak_memory_max_bytes": _as_int_or_none(_max(_peak(r) for r in ok)),
        # what an over-budget setting would have needed (the smallest setting the client tried)
        "peak_memory_needed_bytes": _as_int_or_none(_max(_peak(r) for r in over)),
        "ram_budget_bytes": _as_int_or_none(_max(r.get("ram_budget_bytes") for r in records)),
        "total_flops": _isum(_flops_total(r) for r in records),
        "bytes_up": _isum(r.get("bytes_up") for r in records),
        "bytes_down": _isum(r.get("bytes_down") for r in records),
        "device_time_s": _sum(r.get("device_time_s") for r in records),
        "device_time_mean_s": _mean(r.get("device_time_s") for r in ok),
        "device_time_max_s": _max(r.get("device_time_s") for r in ok),
        "energy_j": _sum(r.get("energy_j") for r in records),
        "energy_mean_j": _mean(r.get("energy_j") for r in ok),
        "methods": sorted({str(r["method"]) for r in ok if r.get("method")}),
        "adapted": sum(1 for r in records if r.get("adapted") is True),
    }


def run_answers(per_round: list[dict], clients: list[dict], target: float | None = None) -> dict:
    """The fleet-level answers (fedpeft.fleet.answers) on the cleaned-up logs: simulated time, what
    reaching `target` took (default: 95% of the run's best; None if never reached; its time None if
    the logs have no clock), and the work wasted on stragglers, drop-outs, failed, rejected and over-budget clients."""
    logged = [r for r in per_round if r["logged"]]
    rounds = [{"round": r["round"], "accuracy": r["accuracy"] if r["accuracy"] is None or 0 <= r["accuracy"] <= 1
               else None, "sim_clock_s": r["sim_clock_s"]} for r in logged]
    records = [{"round": _int(c.get("round")), "status": c.get("status"),
                **{k: max(_num(c.get(k)) or 0.0, 0.0) for k in ("energy_j", "bytes_up", "bytes_down")}}
               for c in clients if _int(c.get("round")) is not None and _int(c.get("round")) >= 0]
    has_clock = bool(rounds) and all(r["sim_clock_s"] is not None for r in rounds)
    if not has_clock:
        rounds = [{**r, "sim_clock_s": 0.0} for r in rounds]
    out = fleet_answers(rounds, records, target if target is not None and 0 < target <= 1 else None)
    if not has_clock:  # logs from before the virtual clock: costs are known, times are not
        out["sim_time_s"] = None
        if out["to_target"] is not None:
            out["to_target"]["sim_time_s"] = None
    return {"sim_time_s": out["sim_time_s"], "target_accuracy": out["target_accuracy"], "to_target": out["to_target"],
            "wasted": out["wasted"]}


def _per_round(rounds: list[dict], clients: list[dict]) -> list[dict]:
    """One row per round number seen in either log; later duplicates of a round replace earlier ones."""
    by_round: dict[int, dict] = {}
    for r in rounds:
        n = _int(r.get("round"))
        if n is not None:
            by_round[n] = r
    client_rounds: dict[int, list[dict]] = {}
    for c in clients:
        n = _int(c.get("round"))
        if n is not None:
            client_rounds.setdefault(n, []).append(c)
    rows, cumulative, total_bytes, energy = [], 0, 0, 0.0
    for n in sorted(set(by_round) | set(client_rounds)):
        r, cs = by_round.get(n, {}), client_rounds.get(n)
        # the client log is the ground truth for bytes; the round line covers rounds without client lines
        up = _isum(c.get("bytes_up") for c in cs) if cs else _int(r.get("bytes_up")) or 0
        down = _isum(c.get("bytes_down") for c in cs) if cs else _int(r.get("bytes_down")) or 0
        cumulative += up
        total_bytes += up + down
        energy += _sum(c.get("energy_j") for c in cs or [])
        rows.append({"round": n, "accuracy": _num(r.get("accuracy")), "loss": _num(r.get("loss")),
                     "bytes_up": up, "bytes_down": down, "bytes_up_cumulative": cumulative,
                     "bytes_cumulative": total_bytes, "energy_j_cumulative": energy,
                     "sim_time_s": _num(r.get("sim_time_s")), "sim_clock_s": _num(r.get("sim_clock_s")),
                     "clients_straggler": sum(1 for c in cs or [] if _status(c) == "straggler"),
                     "clients_dropped_out": sum(1 for c in cs or [] if _status(c) == "dropped_out"),
                     "clients": len(cs) if cs else _int(r.get("clients_sampled")) or 0,
                     "clients_ok": sum(1 for c in cs if _status(c) == "ok") if cs else _int(r.get("clients_ok")) or 0,
                     "device_time_s": _sum(c.get("device_time_s") for c in cs or []),
                     "wall_s": _num(r.get("wall_s")), "logged": n in by_round})
    return rows


def summarize(run_dir: str | Path, write: bool = True) -> dict:
    """Summary of one run; with `write`, also saved to `run_dir/summary.json` (atomically).

    Missing or empty logs give zero totals and null accuracies, never an error; a missing
    run directory or a log corrupt before its last line raises UsageError.
    """
    run_dir = _run_dir(run_dir)
    config = _read_config(run_dir)
    clients = _read_optional(run_dir / "clients.jsonl")
    rounds = _read_optional(run_dir / "rounds.jsonl")
    per_round = _per_round(rounds, clients)

    with_acc = [r for r in per_round if r["logged"] and r["accuracy"] is not None]
    initial = next((r["accuracy"] for r in with_acc if r["round"] == 0), None)
    final = with_acc[-1] if with_acc else None
    best = max(with_acc, key=lambda r: r["accuracy"]) if with_acc else None
    trained_rounds = [r["round"] for r in per_round if r["logged"] and r["round"] > 0]
    n_rounds = max(trained_rounds, default=0)

    ok = [c for c in clients if _status(c) == "ok"]
    counts = {s: 0 for s in STATUSES}
    for c in clients:
        counts[_status(c)] = counts.get(_status(c), 0) + 1

    by_device: dict[str, list[dict]] = {}
    for c in clients:
        by_device.setdefault(str(c.get("device") or "unknown"), []).append(c)
    devices = {name: _device_aggregate(recs) for name, recs in sorted(by_device.items())}

    bytes_up = _isum(c.get("bytes_up") for c in clients)
    round_walls = [r["wall_s"] for r in per_round if r["wall_s"] is not None]
    summary = {
        "run_dir": str(run_dir),
        "config": config,
        "model": config.get("model"),
        "method": config.get("method"),
        "rounds": n_rounds,
        "rounds_planned": config.get("rounds"),
        "initial_accuracy": initial,
        "final_accuracy": final["accuracy"] if final else None,
        "final_round": final["round"] if final else None,
        "final_loss": final["loss"] if final else None,
        "best_accuracy": best["accuracy"] if best else None,
        "best_round": best["round"] if best else None,
        "bytes_up": bytes_up,
        "bytes_down": _isum(c.get("bytes_down") for c in clients),
        "bytes_up_per_round": bytes_up / n_rounds if n_rounds else None,
        "total_flops": _isum(_flops_total(c) for c in clients),
        "flops": {k: _isum(_flops_total(c, k) for c in clients) for k in FLOP_KEYS},
        "device_time_s": _sum(c.get("device_time_s") for c in clients),
        "compute_s": _sum(c.get("compute_s") for c in clients),
        "comm_s": _sum(c.get("comm_s") for c in clients),
        "energy_j": _sum(c.get("energy_j") for c in clients),
        "peak_memory_mean_bytes": _as_int_or_none(_mean(_peak(c) for c in ok)),
        "peak_memory_max_bytes": _as_int_or_none(_max(_peak(c) for c in ok)),
        "client_records": len(clients),
        "clients": len({c.get("client_id") for c in clients if c.get("client_id") is not None}),
        "status_counts": counts,
        "adapted": sum(1 for c in clients if c.get("adapted") is True),
        "devices": devices,
        "per_round": per_round,
        "wall_s": sum(round_walls) if round_walls else None,
        "client_wall_s": _sum(c.get("wall_s") for c in clients),
        **run_answers(per_round, clients, _num(config.get("target_accuracy")) or None),
    }
    densities = [c for c in clients if c.get("density_realised") is not None]
    if densities:  # TaskEdge: the share of the masked weights its masks train (mean over client-rounds)
        summary["taskedge_density"] = {"requested": _mean(c.get("density_requested") for c in densities),
                                       "realised": _mean(c["density_realised"] for c in densities)}
    if write:
        atomic_write_bytes(run_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def load_summary(run_dir: str | Path) -> dict:
    """`summary.json` when present and at least as new as the logs, else a fresh `summarize`."""
    run_dir = _run_dir(run_dir)
    path = run_dir / "summary.json"
    logs = [run_dir / n for n in ("clients.jsonl", "rounds.jsonl", "config.json") if (run_dir / n).exists()]
    if path.is_file() and all(path.stat().st_mtime >= p.stat().st_mtime for p in logs):
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            pass
    return summarize(run_dir)

