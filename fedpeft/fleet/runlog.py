"""The run's directory: its log files, written as the run goes (one JSON line per client per round
in clients.jsonl and per round in rounds.jsonl, each flushed at once so a run that dies keeps
everything it already wrote), and its checkpoint, written atomically after every round.

A run directory belongs to one run: a new run refuses a directory that holds another run's logs
unless told to `overwrite` it; `resume` continues it from the checkpoint, first cutting the logs
back to the lines that checkpoint had seen (a killed round's lines are dropped, then redone).
"""
from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

from fedpeft.errors import UsageError, require
from fedpeft.paths import atomic_write_bytes

LOGS = ("clients.jsonl", "rounds.jsonl")
CHECKPOINT = "checkpoint.pt"
# Settings a resumed run may change: where it runs and how it was started, not what it computes.
RESUMABLE_CHANGES = ("resume", "overwrite", "out", "cache_dir", "round_timeout_s",
                     "ray_address", "client_cpus", "client_gpus", "device")


def check_out_dir(out: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """The run directory, checked before anything starts: a directory we can write to, and not
    another run's unless `overwrite` (or `resume`, which needs one). Raises UsageError."""
    path = Path(out)
    require(not path.exists() or path.is_dir(), f"out: {out} is a file, not a directory")
    if resume:
        require((path / "config.json").is_file(), f"resume: {out} holds no run (no config.json)")
    elif not overwrite:
        used = [n for n in LOGS if (path / n).is_file() and (path / n).stat().st_size > 0]
        require(not used, f"out: {out} holds a previous run ({used[0] if used else ''}); pass --overwrite to "
                          "replace it or --resume to continue it")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"out: cannot write to {out} ({exc.strerror or exc})") from None
    return path


def _finite(value):
    """JSON has no NaN or inf: such a number is logged as null (the validators reject it anyway)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class RunLog:
    def __init__(self, out_dir: str | Path, config: dict, keep_lines: dict[str, int] | None = None):
        """A fresh log, or with `keep_lines` ({file: lines}) the log of a resumed run cut back to those lines."""
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.lines = dict.fromkeys(LOGS, 0)
        for name in LOGS:
            path = self.dir / name
            if keep_lines is None:
                path.write_text("")  # a new run starts its own log
                continue
            kept = path.read_bytes().split(b"\n")[: keep_lines.get(name, 0)] if path.is_file() else []
            require(len(kept) == keep_lines.get(name, 0),
                    f"resume: {path} has {len(kept)} lines, the checkpoint saw {keep_lines.get(name, 0)}")
            atomic_write_bytes(path, b"".join(line + b"\n" for line in kept))
            self.lines[name] = len(kept)
        atomic_write_bytes(self.dir / "config.json", json.dumps(config, indent=2).encode())

    def _append(self, name: str, record: dict) -> None:
        with open(self.dir / name, "a") as fh:
            fh.write(json.dumps(_finite(record), allow_nan=False) + "\n")
            fh.flush()
        self.lines[name] += 1

    def client(self, record: dict) -> None:
        self._append("clients.jsonl", record)

    def round(self, record: dict) -> None:
        self._append("rounds.jsonl", record)

    # -- checkpoint ------------------------------------------------------------------------------
    def save_checkpoint(self, server_round: int, global_delta: dict, clock_s: float = 0.0, mixed: bool = False) -> None:
        """Everything a resumed run needs, in one file replaced atomically: the last complete round,
        the global adapter (with TaskEdge's shared mask, if any), the virtual clock, and how many log
        lines it covers, and whether the state is a mixed run's weight-space one. No RNG state: every draw (sampling, local training, jitter, traces) is seeded
        by (seed, round, client)."""
        buffer = io.BytesIO()
        import torch  # here, not at the top: the CLI checks --out before torch is loaded

        torch.save({"round": server_round, "global_delta": global_delta, "lines": dict(self.lines),
                    "clock_s": float(clock_s), "mixed": bool(mixed)}, buffer)
        atomic_write_bytes(self.dir / CHECKPOINT, buffer.getvalue())


def load_checkpoint(out_dir: str | Path) -> dict | None:
    """The checkpoint of the run in `out_dir`, or None when it completed no round yet."""
    path = Path(out_dir) / CHECKPOINT
    if not path.is_file():
        return None
    import torch

    try:
        state = torch.load(path, weights_only=True)  # weights_only: a checkpoint file runs no code
        require(isinstance(state, dict) and isinstance(state.get("round"), int) and isinstance(state.get("lines"), dict)
                and isinstance(state.get("global_delta"), dict), "missing round, lines or global_delta")
    except Exception as exc:  # noqa: BLE001  (any unreadable checkpoint is one clear error)
        raise UsageError(f"resume: {path} is not a fedpeft checkpoint ({exc})") from None
    return state


def read_run_config(out_dir: str | Path) -> dict:
    """The settings of the run in `out_dir` (its config.json). Raises UsageError."""
    path = Path(out_dir) / "config.json"
    require(path.is_file(), f"resume: {out_dir} holds no run (no config.json)")
    try:
        stored = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"resume: {path} is not readable JSON ({exc})") from None
    require(isinstance(stored, dict), f"resume: {path} is not a run config")
    return stored


def check_same_run(out_dir: str | Path, config: dict) -> None:
    """A resumed run must compute what the original did: its settings, but for RESUMABLE_CHANGES."""
    stored = read_run_config(out_dir)
    differ = sorted(k for k in set(stored) | set(config)
                    if k not in RESUMABLE_CHANGES and stored.get(k) != config.get(k))
    require(not differ, f"resume: settings differ from the run in {out_dir}: "
                        + ", ".join(f"{k} ({stored.get(k)!r} -> {config.get(k)!r})" for k in differ[:5]))
