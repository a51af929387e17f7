"""Where fedpeft keeps what it caches (pre-trained checkpoints, step profiles)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir(override: str | Path | None = None) -> Path:
    """`override`, else $FEDPEFT_CACHE, else ~/.cache/fedpeft."""
    path = Path(override or os.environ.get("FEDPEFT_CACHE") or Path.home() / ".cache" / "fedpeft")
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write whole or not at all: a crash mid-write never leaves a truncated file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
