"""Data loaders whose batch order depends only on the seed and the epoch, single-process or sharded."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler


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
