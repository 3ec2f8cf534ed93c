"""The on-disk datasets: MNIST IDX files, the CIFAR-10 and STL-10 binary versions.

Each reader takes the data directory and an optional per-split ``limit`` and returns the three
(images, labels) pairs of train / val / test as tensors, reading only the records used (plain files
are memory-mapped). A missing file raises :class:`DatasetNotFoundError`, a malformed or truncated
one :class:`DatasetFileError`; both name the file, the expected format and where to get the data
(:data:`SOURCES`). Nothing here touches the network.
"""
from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import BadInputError, CorruptFileError, MissingFileError

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

_MNIST_VAL = 5000                  # GradDiv: validation = last 5,000 of the 60,000 training images
_CIFAR_RECORD = 1 + 3 * 32 * 32    # label byte + R, G, B planes (each 32x32 row-major)
_STL_IMAGE = 3 * 96 * 96           # 3 channels of 96x96, each stored column-major


class DatasetFileError(CorruptFileError):
    """A dataset file exists but is malformed or truncated (a ``ValueError``; exit code 3 on the command
    line). ``path`` is the offending file."""


class DatasetNotFoundError(MissingFileError):
    """A dataset file (or ``data_dir``) does not exist (a ``FileNotFoundError``; exit code 2 on the command
    line). ``path`` names what was looked for."""


def require_data_dir(name: str, data_dir) -> Path:
    if data_dir is None:
        raise BadInputError(f"load_dataset: dataset {name!r} is read from disk, so data_dir (--data-dir) is "
                            f"required; put {SOURCES[name]}")
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


def load_mnist(root: Path, limit: int | None):
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


def load_cifar10(root: Path, limit: int | None):
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


def load_stl10(root: Path, limit: int | None):
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
