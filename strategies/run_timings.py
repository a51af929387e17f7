"""Cheap wall-clock timers of a run's phases, written to `DIR/timings.jsonl`: one `server` line per
round (exchange: sending and waiting for the clients; aggregate; evaluate; log: the round's lines
and checkpoint), one `client` line per reply (the client's own `t.*_s` laps: lookup, build, train,
upload), one `setup` line (what the server builds before round 1, the roll call) and, from the
simulation driver, one `driver` line. experiments/benchmarks/sim_overhead.py splits a run's wall
time with them. They differ between two runs of one seed, so they stay out of the result logs."""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

FILE = "timings.jsonl"


class RunTimings:
    def __init__(self, run_dir: str | Path, append: bool = False):
        self.path = Path(run_dir) / FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not append:
            self.path.write_text("")
        self.current: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        """Add the time the block takes to this round's (or the setup's) `name`_s."""
        start = time.perf_counter()
        try:
            yield
        finally:
            key = f"{name}_s"
            self.current[key] = self.current.get(key, 0.0) + time.perf_counter() - start

    def mark(self, name: str) -> None:
        """Note the wall-clock time of an event (unix seconds), once: the first occurrence counts."""
        self.current.setdefault(f"{name}_unix", time.time())

    def flush(self, kind: str, **fields) -> None:
        """Write the timers gathered since the last flush as one `kind` line, then start afresh."""
        write_line(self.path, {"kind": kind, **fields, **{k: round(v, 6) for k, v in self.current.items()}})
        self.current = {}

    def client(self, msg) -> None:
        """A client line from a reply's `t.*` metrics (nothing for a reply without them)."""
        # Diagnostics only: an error reply (no content), a hostile or malformed one must never stop the
        # server here; the strategy validates and logs every reply on its own.
        if not msg.has_content():
            return
        try:
            metrics = dict(msg.content["metrics"])
            laps = {k[2:]: float(v) for k, v in metrics.items() if k.startswith("t.") and math.isfinite(float(v))}
            line = {"kind": "client", "round": int(metrics.get("round", -1)), "client_id": int(metrics.get("client_id", -1)),
                    "wall_s": float(metrics.get("wall_s", 0.0)), **laps}
        except (KeyError, TypeError, AttributeError, ValueError, OverflowError):
            return
        if laps:
            write_line(self.path, line)


def write_line(path: str | Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def read(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
