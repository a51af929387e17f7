"""Datasets (digits, mnist5k, CIFAR-10), CIFAR-10-C corruptions, adaptation tasks and client partitions."""
from fedpeft.data.corruptions import CORRUPTIONS, NOISE_CORRUPTIONS, SEVERITIES, corrupt, corrupt_dataset
from fedpeft.data.datasets import (
    DATASETS,
    ImageDataset,
    class_names,
    load_cifar10,
    load_dataset,
    load_digits,
    load_mnist5k,
    resize,
)
from fedpeft.data.partition import SCHEMES, label_histogram, partition_for, partition_indices
from fedpeft.data.tasks import TASKS, Task, distribution_shift, make_task, unseen_classes

__all__ = [
    "CORRUPTIONS",
    "DATASETS",
    "ImageDataset",
    "NOISE_CORRUPTIONS",
    "SCHEMES",
    "SEVERITIES",
    "TASKS",
    "Task",
    "class_names",
    "corrupt",
    "corrupt_dataset",
    "distribution_shift",
    "label_histogram",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_mnist5k",
    "make_task",
    "partition_for",
    "partition_indices",
    "resize",
    "unseen_classes",
]
