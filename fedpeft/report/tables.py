"""Terminal tables: one run's cost table by device type, and methods side by side."""
from __future__ import annotations


from fedpeft.report.fmt import _acc, _table, fmt_bytes, fmt_mib, fmt_ratio
from fedpeft.report.plots import _title


def headline(summary: dict) -> str:
    """One line: what ran, accuracy initial -> final (best), total uplink."""
    rounds = summary.get("rounds") or 0
    best = summary.get("best_accuracy")
    best_txt = f" (best {_acc(best)} @ round {summary.get('best_round')})" if best is not None and best != summary.get(
        "final_accuracy") else ""
    return (f"{_title(summary)}: accuracy {_acc(summary.get('initial_accuracy'))} -> "
            f"{_acc(summary.get('final_accuracy'))}{best_txt} after {rounds} round{'s' if rounds != 1 else ''}; "
            f"uplink {fmt_bytes(summary.get('bytes_up', 0))} total, downlink {fmt_bytes(summary.get('bytes_down', 0))}")


def run_table(summary: dict) -> str:
    """The per-device cost table of one run, a total line, and a one-line headline."""
    headers = ["device", "clients", "ok", "over", "unavail", "late", "dropped", "failed", "rejected", "peak MiB",
               "budget MiB",
               "GFLOP", "up", "down", "time s", "energy J"]
    devices = summary.get("devices", {})
    rows = []
    for name, d in sorted(devices.items(), key=lambda kv: (kv[1].get("ram_budget_bytes") or 0, kv[0])):
        peak = d.get("peak_memory_mean_bytes")
        needed = d.get("peak_memory_needed_bytes")
        peak_txt = fmt_mib(peak) if peak is not None else (f"needs {fmt_mib(needed)}" if needed else "-")
        rows.append([name, str(d.get("clients", 0)), str(d.get("ok", 0)), str(d.get("over_budget", 0)),
                     str(d.get("unavailable", 0)), str(d.get("straggler", 0)), str(d.get("dropped_out", 0)),
                     str(d.get("failed", 0)), str(d.get("rejected", 0)), peak_txt, fmt_mib(d.get("ram_budget_bytes"), 0),
                     f"{(d.get('total_flops') or 0) / 1e9:,.2f}", fmt_bytes(d.get("bytes_up", 0)),
                     fmt_bytes(d.get("bytes_down", 0)), f"{d.get('device_time_s') or 0:,.1f}",
                     f"{d.get('energy_j') or 0:,.1f}"])
    counts = summary.get("status_counts", {})
    total = ["total", str(summary.get("clients", 0)), str(counts.get("ok", 0)), str(counts.get("over_budget", 0)),
             str(counts.get("unavailable", 0)), str(counts.get("straggler", 0)), str(counts.get("dropped_out", 0)),
             str(counts.get("failed", 0)), str(counts.get("rejected", 0)),
             fmt_mib(summary.get("peak_memory_max_bytes")) + " max" if summary.get("peak_memory_max_bytes") else "-",
             "", f"{(summary.get('total_flops') or 0) / 1e9:,.2f}", fmt_bytes(summary.get("bytes_up", 0)),
             fmt_bytes(summary.get("bytes_down", 0)), f"{summary.get('device_time_s') or 0:,.1f}",
             f"{summary.get('energy_j') or 0:,.1f}"]
    body = _table(headers, rows + [total])
    lines = body.split("\n")
    if rows:  # a rule above the total line
        lines.insert(len(lines) - 1, lines[1])
    note = ("counts are client-rounds (late: missed the round's deadline; dropped: left mid-round); peak = mean "
            "over clients that trained; time = simulated device time summed over client-rounds")
    return "\n".join(lines + [note, headline(summary), answers_line(summary)])


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:,.1f} s" if s < 3600 else f"{s / 3600:,.2f} h"


def answers_line(summary: dict) -> str:
    """The fleet-level answer: simulated time, and what reaching the target accuracy took."""
    target, reached, wasted = summary.get("target_accuracy"), summary.get("to_target"), summary.get("wasted") or {}
    if target is None:
        to_target = "no accuracy logged"
    elif reached is None:
        to_target = f"target accuracy {target:.4f} not reached"
    else:
        to_target = (f"reached {target:.4f} at round {reached['round']}: {_seconds(reached.get('sim_time_s'))}, "
                     f"{reached['energy_j']:,.1f} J, {fmt_bytes(reached['bytes'])}")
    return (f"simulated time {_seconds(summary.get('sim_time_s'))}; {to_target}; wasted "
            f"{wasted.get('energy_j', 0):,.1f} J, {fmt_bytes(wasted.get('bytes', 0))} "
            f"({wasted.get('clients', 0)} client-rounds)")


def compare_table(rows: list[dict]) -> str:
    """Terminal table of `compare` rows; the `up/fft` column is each method's uplink over fft's."""
    has_fft = any(r.get("bytes_up_vs_fft") is not None for r in rows)
    headers = ["method", "final acc", "uplink", "downlink"] + (["up/fft"] if has_fft else []) + \
              ["GFLOP", "peak MiB", "time s", "energy J", "over budget", "late", "dropped", "sim time",
               "to target", "J to target", "bytes to target", "wasted J"]
    body = []
    for r in rows:
        body.append([r["method"], _acc(r.get("final_accuracy")), fmt_bytes(r.get("bytes_up")),
                     fmt_bytes(r.get("bytes_down"))] + ([fmt_ratio(r.get("bytes_up_vs_fft"))] if has_fft else []) +
                    [f"{(r.get('total_flops') or 0) / 1e9:,.2f}", fmt_mib(r.get("peak_memory_max_bytes")),
                     f"{r.get('device_time_s') or 0:,.1f}", f"{r.get('energy_j') or 0:,.1f}",
                     str(r.get("clients_over_budget", 0)), str(r.get("clients_straggler", 0)),
                     str(r.get("clients_dropped_out", 0)), _seconds(r.get("sim_time_s")),
                     _seconds(r.get("time_to_target_s")) if r.get("round_to_target") is not None else "never",
                     "-" if r.get("energy_to_target_j") is None else f"{r['energy_to_target_j']:,.1f}",
                     fmt_bytes(r.get("bytes_to_target")), f"{r.get('wasted_energy_j') or 0:,.1f}"])
    target = next((r.get("target_accuracy") for r in rows if r.get("target_accuracy") is not None), None)
    note = ("time s: device time summed over client-rounds; sim time: the fleet's simulated wall clock; to target: "
            f"simulated time, energy and bytes until the first round at accuracy >= {_acc(target)} (target_accuracy, "
            "else 95% of the lowest best accuracy of these runs)")
    return _table(headers, body) + "\n" + note
