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
from fedpeft.report.compare import COMPARE_FIELDS, compare
from fedpeft.report.fmt import fmt_bytes, fmt_flops, fmt_float, fmt_mib, fmt_ratio
from fedpeft.report.plots import PLOT_NAMES, plot_compare, plot_run
from fedpeft.report.summary import FLOP_KEYS, STATUSES, load_summary, read_jsonl, summarize
from fedpeft.report.tables import compare_table, headline, run_table

__all__ = ["COMPARE_FIELDS", "FLOP_KEYS", "PLOT_NAMES", "STATUSES", "compare", "compare_table", "fmt_bytes",
           "fmt_flops", "fmt_float", "fmt_mib", "fmt_ratio", "headline", "load_summary", "plot_compare", "plot_run",
           "read_jsonl", "run_table", "summarize"]
