"""The plots of a run (accuracy, uplink, memory against budgets, device time) and of a comparison.
Figures are built without pyplot: no global backend, no GUI, safe in Ray workers and tests."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from fedpeft.paths import atomic_write_bytes
from fedpeft.report.fmt import MiB, _num, _status, fmt_bytes
from fedpeft.report.summary import _read_optional, _run_dir, summarize

PLOT_NAMES = ("accuracy.png", "uplink.png", "memory.png", "device_time.png")


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




_CURVE_AXES = (  # per-round key on the x axis, label, scale
    ("sim_clock_s", "simulated time (s)", 1.0),
    ("energy_j_cumulative", "fleet energy (J, cumulative)", 1.0),
    ("bytes_cumulative", "bytes up + down (MiB, cumulative)", MiB),
)


def plot_curves(curves: dict[str, list[dict]], path: str | Path) -> Path:
    """Accuracy against simulated time, against the fleet's energy and against bytes moved: one line
    per method (`curves`: method -> its summary's per_round rows)."""
    colors = _device_colors(list(curves))
    fig, axes = _figure(ncols=len(_CURVE_AXES), size=(5.0 * len(_CURVE_AXES), 4.2))
    for ax, (key, label, scale) in zip(axes[0], _CURVE_AXES):
        drawn = False
        for name, rows in curves.items():
            pts = [(r[key] / scale, r["accuracy"]) for r in rows
                   if r.get("logged") and r.get("accuracy") is not None and r.get(key) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", markersize=4, linewidth=2, color=colors[name], label=name)
                drawn = True
        if not drawn:
            _no_data(ax, "no clock in these logs" if key == "sim_clock_s" else "no data logged")
        ax.set_xlabel(label)
        ax.set_ylabel("global test accuracy")
        ax.grid(True, alpha=0.3)
    if curves:
        axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    fig.suptitle("Accuracy against what it cost (round 0 = pre-trained model)", fontsize=13)
    return _save(fig, Path(path))
