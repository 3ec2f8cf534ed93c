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
``FileNotFoundError`` and a :class:`fastdiv.errors.MissingFileError`), a malformed or truncated one
:class:`DatasetFileError` (a ``ValueError`` and a :class:`fastdiv.errors.CorruptFileError`); both name
the file, the expected format and where to get the data.

The augmentations (:func:`random_shift`, :func:`random_flip`, :func:`truncated_normal_noise`) are
pure, seeded tensor ops on a batch, on whatever device the batch lives on.

The package's modules: :mod:`~fastdiv.data.datasets` (``load_dataset``, the embedded data),
:mod:`~fastdiv.data.disk` (the on-disk formats), :mod:`~fastdiv.data.loaders` and
:mod:`~fastdiv.data.augment`.
"""
from .augment import random_flip, random_shift, truncated_normal_noise
from .datasets import DATASETS, DatasetSplits, load_dataset
from .disk import SOURCES, DatasetFileError, DatasetNotFoundError
from .loaders import EpochSampler, make_loader

__all__ = [
    "DATASETS", "SOURCES", "DatasetFileError", "DatasetNotFoundError", "DatasetSplits", "EpochSampler",
    "load_dataset", "make_loader", "random_flip", "random_shift", "truncated_normal_noise",
]
