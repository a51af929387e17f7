"""Split a labelled dataset across clients with flwr-datasets partitioners.

The labels go into an in-memory `datasets.Dataset` with an "index" column, the partitioner
splits it, and each partition comes back as the original indices (numpy int64). Results are
cached in-process per arguments, so a fleet asking for one partition per client pays for the
partitioning once.
"""
from __future__ import annotations

import functools
import hashlib
import warnings

import numpy as np

from fedpeft.errors import UsageError, choice, require

SCHEMES = ("iid", "dirichlet", "pathological")
_DIRICHLET_MIN_SIZE = 10  # flwr-datasets' default min_partition_size


def _labels_array(labels) -> np.ndarray:
    try:
        import torch

        if isinstance(labels, torch.Tensor):
            labels = labels.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise UsageError(f"labels: expected a 1-d array of class ids, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise UsageError("labels: expected integer class ids")
    return arr.astype(np.int64, copy=False)


def _validate(n: int, num_partitions, scheme, alpha, classes_per_partition) -> None:
    choice("scheme", scheme, SCHEMES)
    require(n >= 1, "labels: the dataset to partition is empty")
    require(
        isinstance(num_partitions, (int, np.integer)) and not isinstance(num_partitions, bool)
        and 1 <= int(num_partitions) <= n,
        f"num_partitions: must be an integer between 1 and the number of samples ({n}), got {num_partitions!r}",
    )
    if scheme == "dirichlet":
        require(
            isinstance(alpha, (int, float, np.integer, np.floating)) and np.isfinite(alpha) and float(alpha) > 0,
            f"alpha: the Dirichlet concentration must be a number > 0, got {alpha!r}",
        )
    if scheme == "pathological":
        require(
            isinstance(classes_per_partition, (int, np.integer)) and not isinstance(classes_per_partition, bool)
            and int(classes_per_partition) >= 1,
            f"classes_per_partition: must be an integer >= 1, got {classes_per_partition!r}",
        )


def partition_indices(labels, num_partitions: int, scheme: str = "iid", alpha: float = 0.5,
                      classes_per_partition: int = 2, seed: int = 0) -> list[np.ndarray]:
    """Original indices of each of `num_partitions` partitions of a dataset with these labels.

    - "iid": shuffled (by `seed`), then split into contiguous near-equal shards (IidPartitioner).
    - "dirichlet": per class, proportions drawn from Dir(alpha) (DirichletPartitioner). Every
      partition gets at least min(10, N / (4 * num_partitions)) samples where the draws allow;
      with very small alpha that minimum is halved step by step down to 1.
    - "pathological": each partition holds at most `classes_per_partition` classes
      (PathologicalPartitioner, first class of partition i is class i mod C, so all classes are
      used when num_partitions >= C); a class is split evenly among the partitions holding it.

    iid and dirichlet cover every index exactly once. The same arguments give the same result.
    """
    return [p.copy() for p in _partitions(labels, num_partitions, scheme, alpha, classes_per_partition, seed)]


def partition_for(labels, partition_id: int, num_partitions: int, scheme: str = "iid", alpha: float = 0.5,
                  classes_per_partition: int = 2, seed: int = 0) -> np.ndarray:
    """Indices of one partition (cached: asking for every client in turn partitions once)."""
    require(
        isinstance(partition_id, (int, np.integer)) and not isinstance(partition_id, bool)
        and isinstance(num_partitions, (int, np.integer)) and 0 <= int(partition_id) < int(num_partitions),
        f"partition_id: must be an integer in 0..num_partitions-1 ({num_partitions}), got {partition_id!r}",
    )
    parts = _partitions(labels, num_partitions, scheme, alpha, classes_per_partition, seed)
    return parts[int(partition_id)].copy()


def _partitions(labels, num_partitions, scheme, alpha, classes_per_partition, seed) -> tuple[np.ndarray, ...]:
    arr = _labels_array(labels)
    _validate(len(arr), num_partitions, scheme, alpha, classes_per_partition)
    key = (
        hashlib.sha1(arr.tobytes()).hexdigest(), len(arr), int(num_partitions), scheme,
        float(alpha) if scheme == "dirichlet" else None,
        int(classes_per_partition) if scheme == "pathological" else None,
        int(seed),
    )
    return _cached_partitions(key, _Unhashed(arr))


class _Unhashed:
    """Carries the labels into the cached function without being part of the cache key
    (the key holds their digest); all instances compare equal."""

    __slots__ = ("value",)

    def __init__(self, value) -> None:
        self.value = value

    def __hash__(self) -> int:
        return 0

    def __eq__(self, other) -> bool:
        return isinstance(other, _Unhashed)


@functools.lru_cache(maxsize=32)
def _cached_partitions(key: tuple, labels: _Unhashed) -> tuple[np.ndarray, ...]:
    _digest, _n, num_partitions, scheme, alpha, classes_per_partition, seed = key
    arr, labels.value = labels.value, None  # the cache keeps the key, not the labels
    parts = _build(arr, num_partitions, scheme, alpha, classes_per_partition, seed)
    for p in parts:
        p.setflags(write=False)
    return tuple(parts)


def clear_cache() -> None:
    _cached_partitions.cache_clear()


def _dataset(labels: np.ndarray, index: np.ndarray | None = None):
    from datasets import Dataset

    index = np.arange(len(labels)) if index is None else index
    return Dataset.from_dict({"label": labels.tolist(), "index": index.tolist()})


def _indices(partitioner, num_partitions: int) -> list[np.ndarray]:
    return [np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64).reshape(-1)
            for i in range(num_partitions)]


def _build(labels: np.ndarray, num_partitions: int, scheme: str, alpha, classes_per_partition,
           seed: int) -> list[np.ndarray]:
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    if scheme == "iid":
        # IidPartitioner shards contiguously without shuffling; shuffle the rows first (by seed)
        # so that the shards are IID.
        order = np.random.default_rng(seed).permutation(len(labels))
        partitioner = IidPartitioner(num_partitions=num_partitions)
        partitioner.dataset = _dataset(labels[order], order)
        return _indices(partitioner, num_partitions)

    if scheme == "dirichlet":
        n = len(labels)
        min_size = max(1, min(_DIRICHLET_MIN_SIZE, n // (4 * num_partitions)))
        last_error = None
        ds = _dataset(labels)
        while min_size >= 1:
            partitioner = DirichletPartitioner(
                num_partitions=num_partitions, partition_by="label", alpha=alpha,
                min_partition_size=min_size, self_balancing=False, shuffle=True, seed=seed,
            )
            partitioner.dataset = ds
            try:
                with warnings.catch_warnings():
                    # it warns on every redraw that misses min_partition_size
                    warnings.simplefilter("ignore", UserWarning)
                    return _indices(partitioner, num_partitions)
            except ValueError as exc:  # 10 redraws all left a partition below min_size
                last_error = exc
                min_size //= 2
        raise UsageError(
            f"alpha: Dirichlet partitioning with alpha={alpha} left a partition empty in every draw for "
            f"{num_partitions} partitions of {len(labels)} samples; raise alpha or lower num_partitions "
            f"({last_error})"
        )

    num_classes = len(np.unique(labels))
    require(
        classes_per_partition <= num_classes,
        f"classes_per_partition: {classes_per_partition} is more than the {num_classes} classes in the data",
    )
    partitioner = PathologicalPartitioner(
        num_partitions=num_partitions, partition_by="label", num_classes_per_partition=classes_per_partition,
        class_assignment_mode="first-deterministic", shuffle=True, seed=seed,
    )
    partitioner.dataset = _dataset(labels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            parts = _indices(partitioner, num_partitions)
    except ValueError as exc:
        raise UsageError(f"classes_per_partition: pathological partitioning failed: {exc}") from None
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise UsageError(
            f"num_partitions: pathological partitioning left partitions {empty[:5]} empty; "
            f"lower num_partitions or raise classes_per_partition"
        )
    return parts


def label_histogram(labels, indices, num_classes: int) -> np.ndarray:
    """Count of each class among `labels[indices]` (for reports)."""
    arr = _labels_array(labels)
    return np.bincount(arr[np.asarray(indices, dtype=np.int64)], minlength=int(num_classes))
