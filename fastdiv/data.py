"""Datasets, loaders and the data augmentations of the training recipes.

``load_dataset(name, data_dir)`` returns a :class:`DatasetSplits` with ``train``, ``val`` and ``test``
:class:`~torch.utils.data.TensorDataset` objects holding ``float32`` images ``[N, C, H, W]`` in
``[0, 1]`` and ``int64`` labels. Supported names (:data:`DATASETS`):

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no download), split
  1,257 / 180 / 360 (train / val / test) by a class-stratified permutation that depends only on ``seed``.
- ``mnist``: the four IDX files (``.gz`` or uncompressed) from ``data_dir``; validation = the last
  5,000 training images (the GradDiv recipe), test = ``t10k``.
- ``cifar10``: the *binary* version (``data_batch_1..5.bin``, ``test_batch.bin``); validation = the
  last 10% of the training records. The Python (pickle) version is never read: unpickling a
  downloaded file can run arbitrary code.
- ``stl10``: the binary version (``train_X.bin``, ``train_y.bin``, ``test_X.bin``, ``test_y.bin``);
  validation = the last 10% of the 5,000 labelled training images.
- ``synthetic``: small seeded random data with class-dependent means, for tests.

Nothing here touches the network. A missing file raises :class:`DatasetNotFoundError` (a
``FileNotFoundError``), a malformed or truncated one :class:`DatasetFileError` (a ``ValueError``);
both name the file, the expected format and where to get the data.

The augmentations (:func:`random_shift`, :func:`random_flip`, :func:`truncated_normal_noise`) are
pure, seeded tensor ops on a batch, on whatever device the batch lives on.
"""
from __future__ import annotations

import gzip
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset
from torch.utils.data.distributed import DistributedSampler

__all__ = [
    "DATASETS", "DatasetFileError", "DatasetNotFoundError", "DatasetSplits", "EpochSampler",
    "load_dataset", "make_loader", "random_flip", "random_shift", "truncated_normal_noise",
]

#: Names accepted by :func:`load_dataset`.
DATASETS = ("digits", "mnist", "cifar10", "stl10", "synthetic")

#: Where to get each on-disk dataset and what to put in ``data_dir`` (used in error messages).
SOURCES = {
    "mnist": ("the four MNIST IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
              "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (.gz or uncompressed) directly in data_dir "
              "or in data_dir/MNIST/raw; get them from http://yann.lecun.com/exdb/mnist/ or the mirror "
              "https://ossci-datasets.s3.amazonaws.com/mnist/"),
    "cifar10": ("the CIFAR-10 binary version: data_batch_1.bin .. data_batch_5.bin and test_batch.bin in "
                "data_dir/cifar-10-batches-bin or directly in data_dir; get "
                "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz and extract it into data_dir "
                "(tar xzf cifar-10-binary.tar.gz -C data_dir)"),
    "stl10": ("the STL-10 binary version: train_X.bin, train_y.bin, test_X.bin, test_y.bin in "
              "data_dir/stl10_binary or directly in data_dir; get "
              "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz and extract it into data_dir"),
}

_DIGITS_SPLIT = (1257, 180, 360)   # train / val / test; 70% / 10% / 20% of 1,797
_MNIST_VAL = 5000                  # GradDiv: validation = last 5,000 of the 60,000 training images
_CIFAR_RECORD = 1 + 3 * 32 * 32    # label byte + R, G, B planes (each 32x32 row-major)
_STL_IMAGE = 3 * 96 * 96           # 3 channels of 96x96, each stored column-major
_SYNTHETIC_DEFAULTS = {"shape": (1, 8, 8), "num_classes": 10, "size": (512, 128, 128), "noise": 0.25}


class DatasetFileError(ValueError):
    """A dataset file exists but is malformed or truncated. ``path`` is the offending file."""

    def __init__(self, message: str, path: Path | str | None = None):
        super().__init__(message)
        self.path = None if path is None else Path(path)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset file (or ``data_dir``) does not exist. ``path`` names what was looked for."""

    def __init__(self, message: str, path: Path | str | None = None):
        super().__init__(message)
        self.path = None if path is None else Path(path)

    def __str__(self) -> str:  # FileNotFoundError would otherwise print the args tuple
        return self.args[0]


@dataclass
class DatasetSplits:
    """The three splits of one dataset.

    ``train``, ``val`` and ``test`` are ``TensorDataset(images, labels)`` with ``images`` float32
    ``[N, C, H, W]`` in ``[0, 1]`` and ``labels`` int64 in ``[0, num_classes)``. ``in_shape`` is
    ``(C, H, W)`` after any resize; ``source`` says where the data came from.
    """

    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    in_shape: tuple[int, int, int]
    num_classes: int
    source: str = field(default="")

    def describe(self) -> str:
        """One line: name, image shape, classes and split sizes."""
        c, h, w = self.in_shape
        return (f"{self.name}: {c}x{h}x{w} images, {self.num_classes} classes, train {len(self.train)} / "
                f"val {len(self.val)} / test {len(self.test)}" + (f" ({self.source})" if self.source else ""))


# ---------------------------------------------------------------------------------------------------
# load_dataset
# ---------------------------------------------------------------------------------------------------


def load_dataset(name: str, data_dir: str | Path | None = None, *, resize: int | Sequence[int] | None = None,
                 seed: int = 0, limit: int | None = None, **synthetic_kw) -> DatasetSplits:
    """Loads dataset ``name`` (one of :data:`DATASETS`) as train / val / test splits.

    Args:
        name: ``'digits'``, ``'mnist'``, ``'cifar10'``, ``'stl10'`` or ``'synthetic'``.
        data_dir: directory with the files of ``mnist``, ``cifar10`` or ``stl10`` (see :data:`SOURCES`);
            ignored by ``digits`` and ``synthetic``. Never downloads anything.
        resize: ``None`` (keep), an int ``S`` (-> ``S x S``) or ``(H, W)``: every split is resized with
            bilinear interpolation (``F.interpolate(mode='bilinear', align_corners=False)``,
            antialiased when shrinking), e.g. ``resize=28`` turns the 8x8 digits into MNIST-sized inputs.
        seed: the ``digits`` split and the ``synthetic`` data depend on it (and only on it); the on-disk
            datasets have fixed splits and ignore it.
        limit: if given, each split keeps only its first ``limit`` examples (quick runs). The digits
            splits are class-stratified in order, so their prefixes stay balanced.
        **synthetic_kw: only for ``synthetic``: ``shape=(C, H, W)`` (default ``(1, 8, 8)``),
            ``num_classes`` (10), ``size`` (an int ``n`` for ``(n, n//4, n//4)`` or ``(train, val, test)``,
            default ``(512, 128, 128)``), ``noise`` (pixel noise std around the class means, 0.25).

    Returns:
        :class:`DatasetSplits`.

    Raises:
        DatasetNotFoundError: a needed file or ``data_dir`` is missing (message names it and where to
            get the data).
        DatasetFileError: a file is malformed or truncated (message names it and the expected format).
        ValueError / TypeError: a bad argument (named in the message).
    """
    fn = "load_dataset"
    if name not in DATASETS:
        raise ValueError(f"{fn}: name must be one of {DATASETS}, got {name!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{fn}: seed must be an int, got {type(seed).__name__}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"{fn}: limit must be None or a positive int, got {limit!r}")
    size = _check_resize(resize, fn)
    if synthetic_kw and name != "synthetic":
        raise TypeError(f"{fn}: unexpected keyword argument(s) {sorted(synthetic_kw)} for dataset {name!r} "
                        f"(only 'synthetic' takes {sorted(_SYNTHETIC_DEFAULTS)})")

    if name == "digits":
        splits, source = _load_digits(seed), "sklearn.datasets.load_digits"
    elif name == "synthetic":
        splits, source = _load_synthetic(seed, **synthetic_kw), f"synthetic, seed {seed}"
    else:
        root = _check_data_dir(name, data_dir)
        loader = {"mnist": _load_mnist, "cifar10": _load_cifar10, "stl10": _load_stl10}[name]
        splits, source = loader(root, limit)

    tensors = []
    for x, y in splits:
        if limit is not None:
            x, y = x[:limit], y[:limit]
        if size is not None and tuple(x.shape[-2:]) != size:
            x = _resize(x, size)
        tensors.append((x.contiguous(), y.contiguous()))
    (xtr, ytr), (xva, yva), (xte, yte) = tensors
    num_classes = int(synthetic_kw.get("num_classes", _SYNTHETIC_DEFAULTS["num_classes"])) \
        if name == "synthetic" else 10
    return DatasetSplits(name=name, train=TensorDataset(xtr, ytr), val=TensorDataset(xva, yva),
                         test=TensorDataset(xte, yte), in_shape=tuple(int(s) for s in xtr.shape[1:]),
                         num_classes=num_classes, source=source)


def _check_resize(resize, fn: str) -> tuple[int, int] | None:
    if resize is None:
        return None
    if isinstance(resize, int) and not isinstance(resize, bool):
        resize = (resize, resize)
    if (not isinstance(resize, (tuple, list)) or len(resize) != 2
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in resize)):
        raise ValueError(f"{fn}: resize must be None, a positive int or a pair (H, W) of positive ints, "
                         f"got {resize!r}")
    return int(resize[0]), int(resize[1])


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    # Bilinear weights are a convex combination (also with antialiasing), so values stay in [0, 1]
    # up to rounding; the clamp removes that rounding.
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    out = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return out.clamp_(0.0, 1.0)


def _check_data_dir(name: str, data_dir) -> Path:
    if data_dir is None:
        raise ValueError(f"load_dataset: dataset {name!r} is read from disk, so data_dir is required; "
                         f"put {SOURCES[name]}")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(f"load_dataset: data_dir {str(root)!r} for dataset {name!r} does not exist "
                                   f"or is not a directory; it must hold {SOURCES[name]}", root)
    return root


def _to_float(images: np.ndarray, scale: float) -> torch.Tensor:
    # astype copies into a fresh writable array (the source may be a read-only buffer or a memory map)
    return torch.from_numpy(images.astype(np.float32)).div_(scale)


def _to_labels(labels: np.ndarray, offset: int = 0) -> torch.Tensor:
    return torch.from_numpy(labels.astype(np.int64)) - offset


def _val_ranges(n: int, n_val: int, limit: int | None) -> tuple[tuple[int, int], tuple[int, int]]:
    """Record ranges of train (the head) and val (the tail), each cut to ``limit`` records so that only
    the records used are read from a memory-mapped file."""
    n_train = n - n_val
    cap = (lambda k: k) if limit is None else (lambda k: min(k, limit))
    return (0, cap(n_train)), (n_train, n_train + cap(n_val))


def _gather(chunks: list[np.ndarray], start: int, stop: int) -> np.ndarray:
    """Records ``[start, stop)`` of the concatenation of ``chunks`` (copied, so memory maps can close)."""
    parts, offset = [], 0
    for c in chunks:
        lo, hi = max(start - offset, 0), min(stop - offset, len(c))
        if lo < hi:
            parts.append(np.asarray(c[lo:hi]))
        offset += len(c)
    if not parts:
        return np.empty((0,) + chunks[0].shape[1:], dtype=chunks[0].dtype)
    return np.concatenate(parts)


def _read_bytes(path: Path, dataset: str) -> np.ndarray:
    """The bytes of ``path`` as a uint8 array: gunzipped in memory when the file starts with the gzip
    magic (whatever its name), else memory-mapped so that only the records used are read."""
    with open(path, "rb") as f:
        head = f.read(2)
    if head == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as f:
                return np.frombuffer(f.read(), dtype=np.uint8)
        except (OSError, EOFError, zlib.error) as e:
            raise DatasetFileError(f"load_dataset({dataset!r}): {path} is a corrupt or truncated gzip file "
                                   f"({e}); expected {SOURCES[dataset]}", path) from e
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


# ----------------------------------------------------------------------------------------- digits


def _load_digits(seed: int):
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("load_dataset('digits') needs scikit-learn (it ships the 8x8 digits): "
                          "pip install scikit-learn") from e
    bunch = load_digits()
    x = torch.from_numpy(bunch.data).to(torch.float32).div_(16.0).reshape(-1, 1, 8, 8)
    y = torch.from_numpy(bunch.target).to(torch.int64)
    order = _stratified_order(y, seed)
    _, n_val, n_test = _DIGITS_SPLIT
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    return [(x[train], y[train]), (x[val], y[val]), (x[test], y[test])]


def _stratified_order(y: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded permutation of ``range(len(y))`` in which every prefix is (nearly) class-stratified.

    Each example gets the key (rank + 1/2) / n_c from a random permutation within its class c; sorting
    by key (random tie-breaks) interleaves the classes, so any prefix holds about the same fraction of
    every class (within one example per class)."""
    g = torch.Generator().manual_seed(seed)
    key = torch.empty(len(y), dtype=torch.float64)
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        key[idx] = (torch.arange(len(idx), dtype=torch.float64) + 0.5) / len(idx)
    tie_break = torch.randperm(len(y), generator=g)
    return tie_break[torch.sort(key[tie_break], stable=True).indices]


# -------------------------------------------------------------------------------------- synthetic


def _load_synthetic(seed: int, **kw):
    fn = "load_dataset('synthetic')"
    unknown = set(kw) - set(_SYNTHETIC_DEFAULTS)
    if unknown:
        raise TypeError(f"{fn}: unexpected keyword argument(s) {sorted(unknown)}; accepted: "
                        f"{sorted(_SYNTHETIC_DEFAULTS)}")
    opts = {**_SYNTHETIC_DEFAULTS, **kw}
    shape, num_classes, size, noise = opts["shape"], opts["num_classes"], opts["size"], opts["noise"]
    if (not isinstance(shape, (tuple, list)) or len(shape) != 3
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape)):
        raise ValueError(f"{fn}: shape must be (C, H, W) with positive ints, got {shape!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"{fn}: num_classes must be an int >= 2, got {num_classes!r}")
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, max(size // 4, 1), max(size // 4, 1))
    if (not isinstance(size, (tuple, list)) or len(size) != 3
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size)):
        raise ValueError(f"{fn}: size must be a positive int or (train, val, test) positive ints, got {size!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise < math.inf:
        raise ValueError(f"{fn}: noise must be a finite number >= 0, got {noise!r}")

    g = torch.Generator().manual_seed(seed)
    # Class means in [0.2, 0.8] leave room for the noise before the [0, 1] clamp; nearest-mean
    # classification is then far above chance, so short training runs visibly learn.
    means = torch.rand((num_classes, *shape), generator=g) * 0.6 + 0.2
    splits = []
    for n in size:
        y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
        x = (means[y] + noise * torch.randn((n, *shape), generator=g)).clamp_(0.0, 1.0)
        splits.append((x, y))
    return splits


# ------------------------------------------------------------------------------------------ MNIST

_MNIST_NAMES = {
    "train images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _find_mnist(root: Path, what: str) -> Path:
    dirs = [root, root / "MNIST" / "raw", root / "mnist", root / "raw"]
    for d in dirs:
        for base in _MNIST_NAMES[what]:
            for suffix in ("", ".gz"):
                p = d / (base + suffix)
                if p.is_file():
                    return p
    base = _MNIST_NAMES[what][0]
    raise DatasetNotFoundError(f"load_dataset('mnist'): missing the {what} file {base} (or {base}.gz); looked "
                               f"in {', '.join(str(d) for d in dirs)}; expected {SOURCES['mnist']}", root / base)


def _parse_idx(buf: np.ndarray, path: Path, magic: int) -> np.ndarray:
    """The payload of an IDX file as a uint8 array shaped by its header.

    IDX: two zero bytes, type code 0x08 (unsigned byte), the number of dims, then each dim as a
    big-endian int32, then the data; MNIST images have magic 2051 (3 dims), labels 2049 (1 dim)."""
    ndim = magic & 0xFF
    kind = "images (3 dims)" if magic == 2051 else "labels (1 dim)"
    fmt = f"an IDX {kind} file: magic number {magic} (0x{magic:08x}), {ndim} big-endian int32 dims, uint8 data"
    header = 4 + 4 * ndim
    if buf.size < header:
        raise DatasetFileError(f"load_dataset('mnist'): {path} is too short ({buf.size} bytes) for the "
                               f"{header}-byte header of {fmt}", path)
    found = int.from_bytes(bytes(buf[:4]), "big")
    if found != magic:
        raise DatasetFileError(f"load_dataset('mnist'): {path} has magic number {found} (0x{found:08x}), "
                               f"expected {fmt}", path)
    dims = [int.from_bytes(bytes(buf[4 + 4 * i: 8 + 4 * i]), "big") for i in range(ndim)]
    expected = header + math.prod(dims)
    if buf.size != expected:
        raise DatasetFileError(f"load_dataset('mnist'): {path} holds {buf.size} bytes (uncompressed) but its "
                               f"header declares dims {dims}, i.e. {expected} bytes: the file is truncated "
                               f"or not {fmt}", path)
    if ndim == 3 and min(dims[1:]) < 1:
        raise DatasetFileError(f"load_dataset('mnist'): {path} declares empty images of {dims[1]}x{dims[2]}", path)
    return buf[header:].reshape(dims)


def _check_labels(labels: np.ndarray, path: Path, dataset: str, lo: int, hi: int) -> None:
    if labels.size and (int(labels.min()) < lo or int(labels.max()) > hi):
        bad = int(labels.min()) if int(labels.min()) < lo else int(labels.max())
        raise DatasetFileError(f"load_dataset({dataset!r}): {path} contains label {bad}, expected labels in "
                               f"{lo}..{hi}; is it the right file? Expected {SOURCES[dataset]}", path)


def _load_mnist(root: Path, limit: int | None):
    parsed = {}
    for what, magic in (("train images", 2051), ("train labels", 2049),
                        ("test images", 2051), ("test labels", 2049)):
        path = _find_mnist(root, what)
        parsed[what] = (path, _parse_idx(_read_bytes(path, "mnist"), path, magic))
    for split in ("train", "test"):
        (ipath, images), (lpath, labels) = parsed[f"{split} images"], parsed[f"{split} labels"]
        if len(images) != len(labels):
            raise DatasetFileError(f"load_dataset('mnist'): {ipath} holds {len(images)} images but {lpath} "
                                   f"holds {len(labels)} labels", ipath)
        _check_labels(labels, lpath, "mnist", 0, 9)
    (tpath, train_x), (_, test_x) = parsed["train images"], parsed["test images"]
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DatasetFileError(f"load_dataset('mnist'): training images are {train_x.shape[1]}x{train_x.shape[2]} "
                               f"but test images are {test_x.shape[1]}x{test_x.shape[2]}", tpath)
    n = len(train_x)
    if n < 2:
        raise DatasetFileError(f"load_dataset('mnist'): {tpath} holds {n} image(s); need at least 2 to split "
                               f"off a validation set", tpath)
    # The last 5,000 of 60,000 (= 1/12) per the recipe; smaller files keep the same fraction.
    n_val = min(_MNIST_VAL, max(1, (n + 6) // 12))
    (a, b), (c, d) = _val_ranges(n, n_val, limit)
    t = len(test_x) if limit is None else min(len(test_x), limit)
    train_y, test_y = parsed["train labels"][1], parsed["test labels"][1]
    splits = [(_to_float(train_x[a:b], 255.0)[:, None], _to_labels(train_y[a:b])),
              (_to_float(train_x[c:d], 255.0)[:, None], _to_labels(train_y[c:d])),
              (_to_float(test_x[:t], 255.0)[:, None], _to_labels(test_y[:t]))]
    return splits, f"MNIST IDX files in {tpath.parent}"


# --------------------------------------------------------------------------------------- CIFAR-10


def _find_dir(root: Path, subdir: str, marker: str) -> Path | None:
    for d in (root / subdir, root):
        if (d / marker).is_file():
            return d
    return None


def _load_cifar10(root: Path, limit: int | None):
    d = _find_dir(root, "cifar-10-batches-bin", "data_batch_1.bin")
    if d is None:
        pickled = any((p / "data_batch_1").is_file() for p in (root, root / "cifar-10-batches-py"))
        hint = (" Found the Python (pickle) version, which fastdiv does not read (unpickling downloaded files "
                "can run arbitrary code); use the binary version instead." if pickled else "")
        raise DatasetNotFoundError(f"load_dataset('cifar10'): missing data_batch_1.bin in "
                                   f"{root / 'cifar-10-batches-bin'} "
                                   f"and in {root}.{hint} Expected {SOURCES['cifar10']}",
                                   root / "cifar-10-batches-bin" / "data_batch_1.bin")
    records = {}
    for fname in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        path = d / fname
        if not path.is_file():
            raise DatasetNotFoundError(f"load_dataset('cifar10'): missing {path}; expected {SOURCES['cifar10']}", path)
        buf = _read_bytes(path, "cifar10")
        if buf.size == 0 or buf.size % _CIFAR_RECORD:
            raise DatasetFileError(f"load_dataset('cifar10'): {path} holds {buf.size} bytes, not a positive "
                                   f"multiple of the {_CIFAR_RECORD}-byte record (1 label byte + 3x32x32 "
                                   f"pixel bytes, R then G then B planes, rows in order): the file is "
                                   f"truncated or not CIFAR-10 binary. Expected {SOURCES['cifar10']}", path)
        rec = buf.reshape(-1, _CIFAR_RECORD)
        _check_labels(rec[:, 0], path, "cifar10", 0, 9)
        records[fname] = rec
    train = [records[f"data_batch_{i}.bin"] for i in range(1, 6)]
    test = records["test_batch.bin"]
    n = sum(len(r) for r in train)
    n_val = max(1, (n + 5) // 10)   # last 10% of the training records (5,000 of 50,000)
    (a, b), (c, e) = _val_ranges(n, n_val, limit)
    t = len(test) if limit is None else min(len(test), limit)

    def split(rec: np.ndarray):
        return _to_float(rec[:, 1:].reshape(-1, 3, 32, 32), 255.0), _to_labels(rec[:, 0])

    return [split(_gather(train, a, b)), split(_gather(train, c, e)), split(np.asarray(test[:t]))], \
        f"CIFAR-10 binary files in {d}"


# ----------------------------------------------------------------------------------------- STL-10


def _load_stl10(root: Path, limit: int | None):
    d = _find_dir(root, "stl10_binary", "train_X.bin")
    if d is None:
        raise DatasetNotFoundError(f"load_dataset('stl10'): missing train_X.bin in {root / 'stl10_binary'} and "
                                   f"in {root}; expected {SOURCES['stl10']}", root / "stl10_binary" / "train_X.bin")
    splits = []
    for prefix in ("train", "test"):
        xpath, ypath = d / f"{prefix}_X.bin", d / f"{prefix}_y.bin"
        for p in (xpath, ypath):
            if not p.is_file():
                raise DatasetNotFoundError(f"load_dataset('stl10'): missing {p}; expected {SOURCES['stl10']}", p)
        xbuf, ybuf = _read_bytes(xpath, "stl10"), _read_bytes(ypath, "stl10")
        if xbuf.size == 0 or xbuf.size % _STL_IMAGE:
            raise DatasetFileError(f"load_dataset('stl10'): {xpath} holds {xbuf.size} bytes, not a positive "
                                   f"multiple of {_STL_IMAGE} (one 3x96x96 uint8 image, each channel stored "
                                   f"column-major): the file is truncated or not STL-10 binary. Expected "
                                   f"{SOURCES['stl10']}", xpath)
        n = xbuf.size // _STL_IMAGE
        if ybuf.size != n:
            raise DatasetFileError(f"load_dataset('stl10'): {ypath} holds {ybuf.size} labels (one byte each) but "
                                   f"{xpath} holds {n} images: one of them is truncated. Expected "
                                   f"{SOURCES['stl10']}", ypath)
        _check_labels(ybuf, ypath, "stl10", 1, 10)
        # Stored as [N, C, W, H] (MATLAB column-major per channel); read as [N, C, H, W].
        splits.append((xbuf.reshape(n, 3, 96, 96), ybuf, n, xpath))
    (train_x, train_y, n, xpath), (test_x, test_y, n_test, _) = splits
    if n < 2:
        raise DatasetFileError(f"load_dataset('stl10'): {xpath} holds {n} image(s); need at least 2 to split off "
                               f"a validation set", xpath)
    n_val = max(1, (n + 5) // 10)   # last 10% of the labelled training images (500 of 5,000)
    (a, b), (c, e) = _val_ranges(n, n_val, limit)
    t = n_test if limit is None else min(n_test, limit)

    def split(x: np.ndarray, y: np.ndarray):
        return _to_float(x, 255.0).transpose(2, 3), _to_labels(y, offset=1)

    return [split(train_x[a:b], train_y[a:b]), split(train_x[c:e], train_y[c:e]),
            split(test_x[:t], test_y[:t])], f"STL-10 binary files in {d}"


# ---------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------


def _epoch_base(seed: int) -> int:
    # Spread seeds apart so that (seed, epoch + 1) and (seed + 1, epoch) do not give the same order,
    # as the plain seed + epoch of DistributedSampler would.
    return (int(seed) * 0x9E3779B97F4A7C15) % (2 ** 62)


class EpochSampler(Sampler[int]):
    """Indices of a dataset of ``n`` examples, shuffled by a function of ``(seed, epoch)`` alone.

    ``set_epoch(e)`` selects the order of epoch ``e``; each iteration also advances the epoch by one,
    so a plain ``for epoch ...: for batch in loader`` loop reshuffles every epoch, and a resumed run
    that calls ``set_epoch`` sees exactly the orders of the uninterrupted run. Same orders as the
    DistributedSampler that :func:`make_loader` builds for one process."""

    def __init__(self, n: int, *, shuffle: bool, seed: int):
        self.n, self.shuffle, self.seed, self.epoch = int(n), bool(shuffle), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(_epoch_base(self.seed) + epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


class _AdvancingDistributedSampler(DistributedSampler):
    """DistributedSampler whose epoch also advances after each iteration (like :class:`EpochSampler`)."""

    def __iter__(self):
        it = super().__iter__()
        self.epoch += 1
        return it


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int, drop_last: bool = False,
                distributed: bool = False, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader whose batch order depends only on ``seed`` and the epoch.

    The sampler (``loader.sampler``) has ``set_epoch(epoch)``; call it at the start of each epoch to make
    the order independent of history (e.g. after ``--resume``); without it every pass over the loader
    still reshuffles. With ``distributed=True`` and ``torch.distributed`` initialized, each rank gets
    its shard from a :class:`~torch.utils.data.distributed.DistributedSampler` (the global order is the
    same as the single-process one; padded by repetition unless ``drop_last``); if it is not initialized,
    the loader is the single-process one.

    Example::

        splits = load_dataset('digits')
        loader = make_loader(splits.train, 64, shuffle=True, seed=0)
        for epoch in range(3):
            loader.sampler.set_epoch(epoch)
            for x, y in loader: ...
    """
    fn = "make_loader"
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{fn}: batch_size must be a positive int, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{fn}: seed must be an int, got {type(seed).__name__}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"{fn}: num_workers must be an int >= 0, got {num_workers!r}")
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        sampler = _AdvancingDistributedSampler(dataset, shuffle=shuffle, seed=_epoch_base(seed),
                                               drop_last=drop_last)
    else:
        sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed)
    # The generator only seeds worker processes here (the sampler owns the shuffling).
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      num_workers=num_workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------
# Augmentations (pure batch ops, any device)
# ---------------------------------------------------------------------------------------------------


def _generator(generator, fn: str) -> torch.Generator | None:
    if isinstance(generator, bool):
        raise TypeError(f"{fn}: generator must be a torch.Generator, an int seed or None, got bool")
    if isinstance(generator, int):
        return torch.Generator().manual_seed(generator)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{fn}: generator must be a torch.Generator, an int seed or None, got "
                        f"{type(generator).__name__}")
    return generator


def _draw_device(gen: torch.Generator | None, x: torch.Tensor) -> torch.device:
    # Random numbers are drawn on the generator's device (a CPU generator for a CUDA batch works, at
    # the cost of a small copy); without a generator, on the batch's device from the global RNG.
    return gen.device if gen is not None else x.device


def _check_batch(x, fn: str, min_dim: int) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{fn}: x must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() < min_dim:
        raise ValueError(f"{fn}: x must be a batch with at least {min_dim} dims, got shape {tuple(x.shape)}")


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator | int | None = None) -> torch.Tensor:
    """Shifts every image of ``x`` ``[B, C, H, W]`` by its own random integer offset ``(dy, dx)``,
    each uniform in ``[-max_shift, max_shift]``, filling the uncovered border with zeros.

    This is "pad by ``max_shift`` and take a random crop of the original size" (e.g. CIFAR-10's
    ``RandomCrop(32, padding=4)`` is ``random_shift(x, 4)``). Returns a new tensor; ``x`` is unchanged.
    """
    fn = "random_shift"
    _check_batch(x, fn, 1)
    if x.dim() != 4:
        raise ValueError(f"{fn}: x must be [B, C, H, W], got shape {tuple(x.shape)}")
    if isinstance(max_shift, bool) or not isinstance(max_shift, int) or max_shift < 0:
        raise ValueError(f"{fn}: max_shift must be an int >= 0, got {max_shift!r}")
    gen = _generator(generator, fn)
    if max_shift == 0 or x.numel() == 0:
        return x.clone()
    b, c, h, w = x.shape
    s = max_shift
    off = torch.randint(0, 2 * s + 1, (2, b), generator=gen, device=_draw_device(gen, x)).to(x.device)
    padded = F.pad(x, (s, s, s, s))
    rows = (off[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]   # [B, 1, H, 1]
    cols = (off[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]   # [B, 1, 1, W]
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows, cols]


def random_flip(x: torch.Tensor, generator: torch.Generator | int | None = None, p: float = 0.5) -> torch.Tensor:
    """Mirrors each example of the batch ``x`` ``[B, ..., W]`` horizontally (last dim) with probability
    ``p``, independently per example. Returns a new tensor."""
    fn = "random_flip"
    _check_batch(x, fn, 2)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ValueError(f"{fn}: p must be a probability in [0, 1], got {p!r}")
    gen = _generator(generator, fn)
    flip = torch.rand(x.shape[0], generator=gen, device=_draw_device(gen, x)).to(x.device) < p
    return torch.where(flip.view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)


def truncated_normal_noise(x: torch.Tensor, std: float, generator: torch.Generator | int | None = None, *,
                           bound: float = 2.0, clip: tuple[float, float] | None = (0.0, 1.0)) -> torch.Tensor:
    """``x`` plus truncated-normal noise, clipped to ``clip``: the D_noise augmentation of Diversity
    Training (noise ``N(0, std^2)`` truncated to ``[-bound*std, bound*std]``; the recipe uses
    ``std = eps / 2``, and ``bound = 2`` as TensorFlow's ``truncated_normal``).

    The noise is drawn by inverting the normal CDF on a uniform in ``[Phi(-bound), Phi(bound)]``, so it
    is exactly in range and costs one random draw per element. ``clip=None`` skips the clipping.
    """
    fn = "truncated_normal_noise"
    _check_batch(x, fn, 1)
    if isinstance(std, bool) or not isinstance(std, (int, float)) or not 0 <= std < math.inf:
        raise ValueError(f"{fn}: std must be a finite number >= 0, got {std!r}")
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not 0 < bound < math.inf:
        raise ValueError(f"{fn}: bound must be a positive finite number, got {bound!r}")
    if clip is not None and (len(clip) != 2 or not clip[0] <= clip[1]):
        raise ValueError(f"{fn}: clip must be None or (lo, hi) with lo <= hi, got {clip!r}")
    gen = _generator(generator, fn)
    if std == 0:
        out = x.clone()
    else:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        lo = 0.5 * (1 + math.erf(-bound / math.sqrt(2)))
        u = torch.rand(x.shape, generator=gen, device=_draw_device(gen, x), dtype=dtype).to(x.device)
        z = torch.erfinv((2 * (lo + (1 - 2 * lo) * u) - 1).clamp_(-1 + 1e-7, 1 - 1e-7)) * math.sqrt(2)
        out = (x.to(dtype) + std * z.clamp_(-bound, bound)).to(x.dtype)
    if clip is not None:
        out = out.clamp_(float(clip[0]), float(clip[1]))
    return out
