"""A cache of profiling results: JSON files on disk behind an in-memory dict.

A result is keyed by everything that changes it: model, the method's full hyper-parameters
(`Method.hparams()`, defaults included, ints of float fields made floats), input size, batch
size, number of classes, dtype, seed, the torch, torchvision, peft and galore-torch versions
and the profiler's schema version. The FLOP convention is not part of the key:
one profile counts both conventions and the record holds both.

Directory: the `directory` argument, else `$FEDPEFT_CACHE`, else `~/.cache/fedpeft`; profiles
live in its `profiles/` subfolder, one `<sha256>.json` each, written atomically (temp file in
the same folder, then `os.replace`), so concurrent writers (fleet clients) never leave a torn
file. A file that cannot be read is treated as a miss and overwritten.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

#: Bump when what a profile measures or how it is stored changes: old entries stop matching.
#: 2: DoRA's weight-norm FLOPs counted; library versions in the key.
#: 3: TaskEdge allocates one global budget (fewer entries at low density); realised_density stored.
#: 4: TaskEdge's backward computes the gradient only at the mask (no dense weight gradient).
#: 5: memory traffic per step (`traffic`: bytes by phase and by arithmetic-intensity bucket).
#: 6: `traffic` per op class too (class_kernels: kernel calls, class_bucket_flops, class_bucket_bytes); indexing ops
#:    (index_select, gather, index, index_copy_, ...) count only the elements they index.
SCHEMA_VERSION = 6


def default_cache_dir() -> Path:
    env = os.environ.get("FEDPEFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedpeft"


def cache_key(fields: dict) -> str:
    blob = json.dumps({"schema": SCHEMA_VERSION, **fields}, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class ProfileCache:
    """get/put JSON-able records by key; memory first, then disk."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.root = Path(directory).expanduser() if directory is not None else default_cache_dir()
        self.directory = self.root / "profiles"
        self._memory: dict[str, dict] = {}

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def get(self, key: str) -> dict | None:
        record = self._memory.get(key)
        if record is not None:
            return record
        try:
            with open(self.path(key), encoding="utf-8") as fh:
                record = json.load(fh)
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("key") != key:
            return None
        self._memory[key] = record
        return record

    def put(self, key: str, record: dict) -> None:
        record = {**record, "key": key}
        self._memory[key] = record
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(record, fh, indent=1, sort_keys=True)
            os.replace(tmp, self.path(key))
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def clear_memory(self) -> None:
        self._memory.clear()


_CACHES: dict[Path, ProfileCache] = {}


def get_cache(directory: str | os.PathLike | None = None) -> ProfileCache:
    """One ProfileCache (and so one in-memory dict) per directory per process."""
    root = Path(directory).expanduser() if directory is not None else default_cache_dir()
    cache = _CACHES.get(root)
    if cache is None:
        cache = _CACHES[root] = ProfileCache(root)
    return cache
