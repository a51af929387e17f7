"""Adaptation tasks: a source (pre-training) set and a target set that the fleet adapts to.

- distribution shift: source = clean training images; target = the same dataset under a
  CIFAR-10-C corruption (train and test corrupted with different noise seeds).
- unseen classes: source = training images of a subset of the classes; target = all classes.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np
import torch

from fedpeft.data.corruptions import CORRUPTIONS, check_severity, corrupt_dataset
from fedpeft.data.datasets import ImageDataset, load_dataset, resize
from fedpeft.errors import UsageError, choice

TASKS = ("shift", "unseen")
_BASE_SIZE = 32  # corruptions use the CIFAR-10-C parameters, meant for 32 x 32 images


@dataclass
class Task:
    name: str
    source_train: ImageDataset
    target_train: ImageDataset
    target_test: ImageDataset
    num_classes: int
    source_classes: list[int]
    info: dict = field(default_factory=dict)
    # Held-out test images of the source task (clean test set; for unseen classes, the test images
    # of the source classes): what pre-training is judged on. None for a task built without one.
    source_test: ImageDataset | None = None

    @property
    def source_id(self) -> str:
        """What the source data is, independent of the target: every corruption of one dataset
        shares the clean source, so they share one pre-trained checkpoint."""
        if self.info.get("kind") == "shift":
            return f"clean:{self.info['dataset']}"
        return self.name

    @property
    def target_classes(self) -> list[int]:
        return list(range(self.num_classes))

    @property
    def unseen_classes(self) -> list[int]:
        return [c for c in range(self.num_classes) if c not in set(self.source_classes)]


def _derived_seed(seed: int, stream: int) -> int:
    """Independent seeds for the train and test corruption noise, fixed by `seed`."""
    return int(np.random.SeedSequence([int(seed), int(stream)]).generate_state(1, dtype=np.uint32)[0])


def distribution_shift(dataset: str = "digits", corruption: str = "impulse_noise", severity: int = 5,
                       seed: int = 0, root=None, download: bool = False, size: int = 32) -> Task:
    """Source = clean train; target = corrupted train and test (different corruption seeds).

    Images are loaded (and corrupted) at 32 x 32, then resized to `size`.
    """
    choice("corruption", corruption, CORRUPTIONS)
    severity = check_severity(severity)
    train = load_dataset(dataset, "train", root=root, download=download, size=_BASE_SIZE, seed=seed)
    test = load_dataset(dataset, "test", root=root, download=download, size=_BASE_SIZE, seed=seed)
    train_seed, test_seed = _derived_seed(seed, 1), _derived_seed(seed, 2)
    target_train = corrupt_dataset(train, corruption, severity, seed=train_seed)
    target_test = corrupt_dataset(test, corruption, severity, seed=test_seed)
    return Task(
        name=f"shift:{dataset}:{corruption}:{severity}",
        source_train=resize(train, size),
        target_train=resize(target_train, size),
        target_test=resize(target_test, size),
        num_classes=train.num_classes,
        source_classes=list(range(train.num_classes)),
        info={"kind": "shift", "dataset": dataset, "corruption": corruption, "severity": severity, "seed": seed,
              "train_corruption_seed": train_seed, "test_corruption_seed": test_seed},
        source_test=resize(test, size),
    )


def _check_source_classes(source_classes, num_classes: int) -> list[int]:
    try:
        classes = [int(c) for c in source_classes]
        ok = all(float(c) == int(c) for c in source_classes)
    except (TypeError, ValueError):
        ok = False
    if not ok or not classes:
        raise UsageError(f"source_classes: expected a non-empty list of class ids, got {source_classes!r}")
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise UsageError(f"source_classes: {bad} outside 0..{num_classes - 1}")
    if len(set(classes)) != len(classes):
        raise UsageError(f"source_classes: repeated class ids in {classes}")
    if len(classes) >= num_classes:
        raise UsageError(f"source_classes: must leave at least one of the {num_classes} classes unseen")
    return sorted(classes)


def unseen_classes(dataset: str = "digits", source_classes=None, seed: int = 0, root=None,
                   download: bool = False, size: int = 32) -> Task:
    """Source = train restricted to `source_classes` (default: the first half of the classes);
    target = all classes (train and test). Labels keep their original ids."""
    train = load_dataset(dataset, "train", root=root, download=download, size=size, seed=seed)
    test = load_dataset(dataset, "test", root=root, download=download, size=size, seed=seed)
    num_classes = train.num_classes
    if source_classes is None:
        source_classes = range(num_classes // 2)
    classes = _check_source_classes(source_classes, num_classes)
    keep = torch.isin(train.labels, torch.tensor(classes, dtype=torch.int64))
    keep_test = torch.isin(test.labels, torch.tensor(classes, dtype=torch.int64))
    return Task(
        name=f"unseen:{dataset}:{'-'.join(map(str, classes))}",
        source_train=train.subset(torch.nonzero(keep).flatten()),
        target_train=train,
        target_test=test,
        num_classes=num_classes,
        source_classes=classes,
        info={"kind": "unseen", "dataset": dataset, "source_classes": classes, "seed": seed},
        source_test=test.subset(torch.nonzero(keep_test).flatten()),
    )


def make_task(kind: str, **kwargs) -> Task:
    """`kind` in TASKS ("shift" or "unseen"); keyword arguments go to that task's builder."""
    choice("task", kind, TASKS)
    builder = distribution_shift if kind == "shift" else unseen_classes
    allowed = list(inspect.signature(builder).parameters)
    for key in kwargs:
        choice(f"{kind} task option", key, allowed)
    return builder(**kwargs)
