"""The run's log files, written as the run goes: one JSON line per client per round
(clients.jsonl) and per round (rounds.jsonl), each flushed at once so a run that dies keeps
everything it already wrote."""
from __future__ import annotations

import json
from pathlib import Path

from fedpeft.paths import atomic_write_bytes


class RunLog:
    def __init__(self, out_dir: str | Path, config: dict):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in ("clients.jsonl", "rounds.jsonl"):
            (self.dir / name).write_text("")  # a new run starts its own log
        atomic_write_bytes(self.dir / "config.json", json.dumps(config, indent=2).encode())

    def _append(self, name: str, record: dict) -> None:
        with open(self.dir / name, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()

    def client(self, record: dict) -> None:
        self._append("clients.jsonl", record)

    def round(self, record: dict) -> None:
        self._append("rounds.jsonl", record)
