"""Turn a run's logs into a summary, plots and terminal tables; put several runs side by side.

A fleet run (`fedpeft simulate --out DIR`) writes, as it goes, `DIR/clients.jsonl` (one object per
client per round), `DIR/rounds.jsonl` (one per round; round 0 is the pre-trained model) and
`DIR/config.json`. This module reads them back:

- `read_jsonl(path)`     the records, tolerating a truncated last line (a run killed mid-write)
- `summarize(run_dir)`   totals and per-device aggregates, written to `DIR/summary.json`
- `plot_run(run_dir)`    accuracy.png, uplink.png, memory.png, device_time.png
- `run_table(summary)`   the terminal cost table, one row per device type
- `compare(runs, out)`   one row per method: compare.csv / compare.json / compare.png
- `compare_table(rows)`  the terminal comparison, with each method's uplink relative to fft

Units: bytes and memory are binary (KiB, MiB, GiB = 2**10, 2**20, 2**30); FLOPs decimal
(GFLOP = 1e9); times in seconds of simulated device time unless named `wall_s` (real time).
Totals (bytes, FLOPs, device time, energy) are sums over every client record; peak memory means
and maxima are over clients that trained (`status == "ok"`).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedpeft.errors import UsageError
from fedpeft.paths import atomic_write_bytes

log = logging.getLogger(__name__)

STATUSES = ("ok", "over_budget", "unavailable", "failed", "rejected")
FLOP_KEYS = ("forward", "backward", "optimizer", "total")
COMPARE_FIELDS = ("method", "final_accuracy", "initial_accuracy", "bytes_up", "bytes_down", "total_flops",
                  "peak_memory_max_bytes", "device_time_s", "energy_j", "clients_over_budget",
                  "bytes_up_vs_fft", "rounds", "model", "run_dir")
PLOT_NAMES = ("accuracy.png", "uplink.png", "memory.png", "device_time.png")

MiB = 2**20


# -- formatting -------------------------------------------------------------------------------------
def _fmt_scaled(n: float | None, base: int, base_unit: str, units: tuple[str, ...]) -> str:
    if n is None:
        return "-"
    n = float(n)
    if abs(n) < base:
        return f"{n:.0f} {base_unit}"
    for unit in units:
        n /= base
        if abs(n) < base or unit == units[-1]:
            return f"{n:.1f} {unit}" if abs(n) >= 100 else f"{n:.2f} {unit}"
    raise AssertionError("unreachable")


def fmt_bytes(n: float | None) -> str:
    """Binary units: 512 B, 1.5 KiB, 3.25 MiB, 1.10 GiB; '-' for None."""
    return _fmt_scaled(n, 1024, "B", ("KiB", "MiB", "GiB", "TiB"))


def fmt_flops(n: float | None) -> str:
    """Decimal units: 950 FLOP, 1.23 MFLOP, 45.6 GFLOP, 1.20 TFLOP; '-' for None."""
    return _fmt_scaled(n, 1000, "FLOP", ("kFLOP", "MFLOP", "GFLOP", "TFLOP", "PFLOP"))


def fmt_mib(n: float | None, digits: int = 1) -> str:
    return "-" if n is None else f"{float(n) / MiB:,.{digits}f}"


def fmt_float(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(float(x), spec)


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.3g}x"


# -- reading ----------------------------------------------------------------------------------------
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


# -- summary ----------------------------------------------------------------------------------------
def _num(x: Any) -> float | None:
    """A finite number, else None (null, NaN, inf, strings and bools are not numbers here)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _int(x: Any) -> int | None:
    v = _num(x)
    return None if v is None else int(round(v))


def _sum(values) -> float:
    return sum(v for v in (_num(x) for x in values) if v is not None)


def _isum(values) -> int:
    return int(round(_sum(values)))


def _mean(values) -> float | None:
    nums = [v for v in (_num(x) for x in values) if v is not None]
    return sum(nums) / len(nums) if nums else None


def _max(values) -> float | None:
    nums = [v for v in (_num(x) for x in values) if v is not None]
    return max(nums) if nums else None


def _flops_total(record: dict, key: str = "total") -> float | None:
    flops = record.get("flops")
    return _num(flops.get(key)) if isinstance(flops, dict) else None


def _status(record: dict) -> str:
    return str(record.get("status") or "unknown")


def _peak(record: dict) -> float | None:
    """Peak memory of a record, None when not measured (null or 0, e.g. an unavailable client)."""
    v = _num(record.get("peak_memory_bytes"))
    return v if v else None


def _as_int_or_none(x: float | None) -> int | None:
    return None if x is None else int(round(x))


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
    rows, cumulative = [], 0
    for n in sorted(set(by_round) | set(client_rounds)):
        r, cs = by_round.get(n, {}), client_rounds.get(n)
        # the client log is the ground truth for bytes; the round line covers rounds without client lines
        up = _isum(c.get("bytes_up") for c in cs) if cs else _int(r.get("bytes_up")) or 0
        down = _isum(c.get("bytes_down") for c in cs) if cs else _int(r.get("bytes_down")) or 0
        cumulative += up
        rows.append({"round": n, "accuracy": _num(r.get("accuracy")), "loss": _num(r.get("loss")),
                     "bytes_up": up, "bytes_down": down, "bytes_up_cumulative": cumulative,
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
    }
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


# -- plots ------------------------------------------------------------------------------------------
def _figure(*, ncols: int = 1, nrows: int = 1, size=(7.0, 4.5)):
    # Figure without pyplot: no global backend switch, no GUI, safe in Ray workers and tests.
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", bbox_inches="tight")  # keeps legends placed outside the axes
    atomic_write_bytes(path, buf.getvalue())
    return path


def _no_data(ax, text: str = "no data logged") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray", fontsize=12)


def _title(summary: dict) -> str:
    parts = [str(summary[k]) for k in ("method", "model") if summary.get(k)]
    return " on ".join(parts) if parts else Path(summary.get("run_dir", "run")).name


def _device_colors(names):
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if len(names) <= 10 else colormaps["tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def plot_run(run_dir: str | Path, summary: dict | None = None) -> list[Path]:
    """Write accuracy.png, uplink.png, memory.png and device_time.png into `run_dir`; their paths."""
    run_dir = _run_dir(run_dir)
    summary = summary if summary is not None else summarize(run_dir)
    clients = _read_optional(run_dir / "clients.jsonl")
    title = _title(summary)
    paths = [_plot_accuracy(summary, run_dir / "accuracy.png", title),
             _plot_uplink(summary, run_dir / "uplink.png", title),
             _plot_memory(summary, run_dir / "memory.png", title),
             _plot_device_time(summary, clients, run_dir / "device_time.png", title)]
    return paths


def _plot_accuracy(summary: dict, path: Path, title: str) -> Path:
    fig, axes = _figure()
    ax = axes[0][0]
    pts = [(r["round"], r["accuracy"]) for r in summary["per_round"] if r["accuracy"] is not None]
    if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", linewidth=2)
        for x, y in {pts[0], pts[-1]}:  # label the first and the last point
            ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=9)
        if len(xs) <= 20:
            ax.set_xticks(list(xs))
        lo, hi = min(ys), max(ys)
        ax.set_ylim(max(0.0, lo - 0.05), min(1.0, hi + 0.08) if hi <= 1.0 else hi * 1.05)
    else:
        _no_data(ax, "no accuracy logged")
    ax.set_xlabel("round (0 = pre-trained model)")
    ax.set_ylabel("global test accuracy")
    ax.set_title(f"Accuracy per round — {title}")
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def _plot_uplink(summary: dict, path: Path, title: str) -> Path:
    fig, axes = _figure()
    ax = axes[0][0]
    rows = summary["per_round"]
    if rows:
        xs = [r["round"] for r in rows]
        ax.plot(xs, [r["bytes_up_cumulative"] / MiB for r in rows], marker="o", linewidth=2, label="cumulative")
        ax.bar(xs, [r["bytes_up"] / MiB for r in rows], alpha=0.35, label="this round")
        ax.legend(loc="upper left")
        if len(xs) <= 20:
            ax.set_xticks(xs)
    else:
        _no_data(ax)
    ax.set_xlabel("round")
    ax.set_ylabel("uplink (MiB, all clients)")
    ax.set_title(f"Uplink bytes — {title} (total {fmt_bytes(summary['bytes_up'])})")
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def _plot_memory(summary: dict, path: Path, title: str) -> Path:
    devices = summary["devices"]
    names = sorted(devices, key=lambda n: (devices[n]["ram_budget_bytes"] or 0, n))
    fig, axes = _figure(size=(max(6.0, 1.1 * len(names) + 3), 4.8))
    ax = axes[0][0]
    if not names:
        _no_data(ax)
    else:
        xs = list(range(len(names)))
        values, over = [], []
        for n in names:
            d = devices[n]
            used = d["peak_memory_mean_bytes"]
            values.append((used if used is not None else d["peak_memory_needed_bytes"] or 0) / MiB)
            over.append(used is None and d["peak_memory_needed_bytes"] is not None)
        budgets = [(devices[n]["ram_budget_bytes"] or 0) / MiB for n in names]
        from matplotlib.patches import Patch

        bars = ax.bar(xs, values, color=["tab:red" if o else "tab:blue" for o in over], alpha=0.8)
        for bar, o in zip(bars, over):
            if o:
                bar.set_hatch("//")
        marker = ax.hlines(budgets, [x - 0.45 for x in xs], [x + 0.45 for x in xs], colors="black",
                           linewidths=3, zorder=3)
        for x, v, b in zip(xs, values, budgets):
            ax.annotate(f"{v:,.1f} / {b:,.0f}", (x, max(v, b)), textcoords="offset points", xytext=(0, 5),
                        ha="center", fontsize=8)
        handles = [Patch(facecolor="tab:blue", alpha=0.8, label="mean peak (clients that trained)")]
        if any(over):
            handles.append(Patch(facecolor="tab:red", hatch="//", alpha=0.8, label="needed (over budget)"))
        handles.append(marker)
        marker.set_label("RAM budget")
        positive = [v for v in values + budgets if v > 0]
        if positive and max(positive) / min(positive) > 50:
            ax.set_yscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels(names, rotation=30, ha="right")
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
        ax.margins(y=0.15)
    ax.set_ylabel("memory (MiB)")
    ax.set_title(f"Peak training memory vs RAM budget — {title}")
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def _plot_device_time(summary: dict, clients: list[dict], path: Path, title: str) -> Path:
    ok = [c for c in clients if _status(c) == "ok" and _num(c.get("device_time_s")) is not None]
    names = sorted({str(c.get("device") or "unknown") for c in ok})
    colors = _device_colors(names)
    fig, axes = _figure(ncols=2, size=(12.0, 4.8))
    left, right = axes[0]
    if ok:
        by_client: dict[Any, list[dict]] = {}
        for c in ok:
            by_client.setdefault(c.get("client_id"), []).append(c)
        seen = set()
        for cid, recs in sorted(by_client.items(), key=lambda kv: str(kv[0])):
            recs.sort(key=lambda c: _num(c.get("round")) or 0)
            dev = str(recs[0].get("device") or "unknown")
            left.plot([c.get("round") for c in recs], [c["device_time_s"] for c in recs], marker="o",
                      color=colors[dev], alpha=0.8, label=None if dev in seen else dev)
            seen.add(dev)
        left.legend(fontsize=8, title="device", title_fontsize=9)
        from matplotlib.ticker import MaxNLocator

        left.xaxis.set_major_locator(MaxNLocator(integer=True))
        data = [[c["device_time_s"] for c in ok if str(c.get("device") or "unknown") == n] for n in names]
        box = right.boxplot(data, patch_artist=True)
        for patch, n in zip(box["boxes"], names):
            patch.set_facecolor(colors[n])
            patch.set_alpha(0.6)
        right.set_xticks(range(1, len(names) + 1))
        right.set_xticklabels(names, rotation=30, ha="right")
        values = [v for d in data for v in d if v > 0]
        if values and max(values) / min(values) > 50:
            left.set_yscale("log")
            right.set_yscale("log")
    else:
        _no_data(left, "no client trained")
        _no_data(right, "no client trained")
    left.set_xlabel("round")
    left.set_ylabel("simulated device time (s)")
    left.set_title("Per client, each line one client")
    right.set_ylabel("simulated device time (s)")
    right.set_title("Per device type (clients that trained)")
    for ax in (left, right):
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"Device time per round — {title}")
    return _save(fig, path)


# -- terminal tables --------------------------------------------------------------------------------
def _table(headers: list[str], rows: list[list[str]], left_cols: int = 1) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < left_cols else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def _acc(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


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
    headers = ["device", "clients", "ok", "over", "unavail", "failed", "rejected", "peak MiB", "budget MiB",
               "GFLOP", "up", "down", "time s", "energy J"]
    devices = summary.get("devices", {})
    rows = []
    for name, d in sorted(devices.items(), key=lambda kv: (kv[1].get("ram_budget_bytes") or 0, kv[0])):
        peak = d.get("peak_memory_mean_bytes")
        needed = d.get("peak_memory_needed_bytes")
        peak_txt = fmt_mib(peak) if peak is not None else (f"needs {fmt_mib(needed)}" if needed else "-")
        rows.append([name, str(d.get("clients", 0)), str(d.get("ok", 0)), str(d.get("over_budget", 0)),
                     str(d.get("unavailable", 0)), str(d.get("failed", 0)), str(d.get("rejected", 0)),
                     peak_txt, fmt_mib(d.get("ram_budget_bytes"), 0),
                     f"{(d.get('total_flops') or 0) / 1e9:,.2f}", fmt_bytes(d.get("bytes_up", 0)),
                     fmt_bytes(d.get("bytes_down", 0)), f"{d.get('device_time_s') or 0:,.1f}",
                     f"{d.get('energy_j') or 0:,.1f}"])
    counts = summary.get("status_counts", {})
    total = ["total", str(summary.get("clients", 0)), str(counts.get("ok", 0)), str(counts.get("over_budget", 0)),
             str(counts.get("unavailable", 0)), str(counts.get("failed", 0)), str(counts.get("rejected", 0)),
             fmt_mib(summary.get("peak_memory_max_bytes")) + " max" if summary.get("peak_memory_max_bytes") else "-",
             "", f"{(summary.get('total_flops') or 0) / 1e9:,.2f}", fmt_bytes(summary.get("bytes_up", 0)),
             fmt_bytes(summary.get("bytes_down", 0)), f"{summary.get('device_time_s') or 0:,.1f}",
             f"{summary.get('energy_j') or 0:,.1f}"]
    body = _table(headers, rows + [total])
    lines = body.split("\n")
    if rows:  # a rule above the total line
        lines.insert(len(lines) - 1, lines[1])
    note = ("counts are client-rounds; peak = mean over clients that trained; "
            "time = simulated device time summed over client-rounds")
    return "\n".join(lines + [note, headline(summary)])


# -- comparing runs ---------------------------------------------------------------------------------
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
    rows = []
    for name, run_dir in run_dirs.items():
        s = summarize(run_dir)
        rows.append({"method": str(name), "final_accuracy": s["final_accuracy"],
                     "initial_accuracy": s["initial_accuracy"], "bytes_up": s["bytes_up"],
                     "bytes_down": s["bytes_down"], "total_flops": s["total_flops"],
                     "peak_memory_max_bytes": s["peak_memory_max_bytes"], "device_time_s": s["device_time_s"],
                     "energy_j": s["energy_j"], "clients_over_budget": s["status_counts"].get("over_budget", 0),
                     "bytes_up_vs_fft": None, "rounds": s["rounds"], "model": s["model"],
                     "run_dir": str(run_dir), "config_method": s["method"]})
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
    return rows


_COMPARE_PLOTS = (  # key, title, scale, log
    ("final_accuracy", "final accuracy", 1.0, False),
    ("bytes_up", "uplink (MiB)", MiB, True),
    ("bytes_down", "downlink (MiB)", MiB, True),
    ("total_flops", "training FLOPs (G)", 1e9, True),
    ("peak_memory_max_bytes", "max peak memory (MiB)", MiB, True),
    ("device_time_s", "device time (s, summed)", 1.0, False),
    ("energy_j", "energy (J)", 1.0, False),
    ("clients_over_budget", "client-rounds over budget", 1.0, False),
)


def plot_compare(rows: list[dict], path: str | Path) -> Path:
    """A grid of bar charts, one per metric, one bar per method; log scale for bytes and FLOPs."""
    names = [r["method"] for r in rows]
    colors = _device_colors(names)
    ncols = 4
    nrows = math.ceil(len(_COMPARE_PLOTS) / ncols)
    fig, axes = _figure(ncols=ncols, nrows=nrows, size=(4.0 * ncols, 3.6 * nrows))
    flat = [ax for row in axes for ax in row]
    xs = list(range(len(names)))
    for ax, (key, label, scale, log_scale) in zip(flat, _COMPARE_PLOTS):
        values = [None if r.get(key) is None else r[key] / scale for r in rows]
        heights = [v or 0 for v in values]
        bars = ax.bar(xs, heights, color=[colors[n] for n in names])
        ax.bar_label(bars, labels=["" if v is None else f"{v:.3g}" for v in values], fontsize=8, padding=2)
        ax.margins(y=0.15)
        if log_scale and any(h > 0 for h in heights):
            ax.set_yscale("log")
        for x, v in zip(xs, values):
            if v is None:
                ax.annotate("n/a", (x, 0), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8,
                            color="gray")
        ax.set_xticks(xs)
        ax.set_xticklabels(names, rotation=30, ha="right")
        ax.set_title(label, fontsize=11)
        ax.grid(True, axis="y", alpha=0.3)
    for ax in flat[len(_COMPARE_PLOTS):]:
        ax.set_visible(False)
    fig.suptitle("Methods compared", fontsize=13)
    return _save(fig, Path(path))


def compare_table(rows: list[dict]) -> str:
    """Terminal table of `compare` rows; the `up/fft` column is each method's uplink over fft's."""
    has_fft = any(r.get("bytes_up_vs_fft") is not None for r in rows)
    headers = ["method", "final acc", "uplink", "downlink"] + (["up/fft"] if has_fft else []) + \
              ["GFLOP", "peak MiB", "time s", "energy J", "over budget"]
    body = []
    for r in rows:
        body.append([r["method"], _acc(r.get("final_accuracy")), fmt_bytes(r.get("bytes_up")),
                     fmt_bytes(r.get("bytes_down"))] + ([fmt_ratio(r.get("bytes_up_vs_fft"))] if has_fft else []) +
                    [f"{(r.get('total_flops') or 0) / 1e9:,.2f}", fmt_mib(r.get("peak_memory_max_bytes")),
                     f"{r.get('device_time_s') or 0:,.1f}", f"{r.get('energy_j') or 0:,.1f}",
                     str(r.get("clients_over_budget", 0))])
    return _table(headers, body)
