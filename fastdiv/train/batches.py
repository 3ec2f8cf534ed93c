"""The examples of a training step: which examples (:func:`epoch_indices`), their augmentation and extra
copies (:func:`prepare_batch`: random shifts / flips, a D_noise copy, a static-model FGSM copy) and the
adversarial examples crafted on the fly (:func:`adversarial_examples`: PGD on the model in training).

Every draw is seeded by the step's seed (a function of the run's seed and the step's position) and a
tag of :mod:`fastdiv.train.streams`, so a resumed run prepares exactly the batches an uninterrupted one
does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._seeds import mix_seed
from . import streams
from .config import TrainConfig

__all__ = ["adversarial_examples", "epoch_indices", "offline_eps", "prepare_batch", "static_fgsm"]


class _Sized:
    """Just a length, for the samplers of :func:`fastdiv.data.make_loader`."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):  # pragma: no cover - the samplers never index
        return i


def epoch_indices(n_train: int, local_batch: int, *, seed: int, epoch: int, distributed: bool) -> torch.Tensor:
    """This rank's example indices for ``epoch``: the global order is a function of (seed, epoch)
    only (the order of :func:`fastdiv.data.make_loader`), sharded as DistributedSampler does."""
    from ..data import make_loader
    loader = make_loader(_Sized(n_train), local_batch, shuffle=True, seed=seed, distributed=distributed)
    loader.sampler.set_epoch(epoch)
    return torch.tensor(list(iter(loader.sampler)), dtype=torch.long)


def offline_eps(cfg: TrainConfig) -> float:
    """The radius of the static source model's examples (offline PGD or FGSM copies)."""
    return cfg.offline_eps if cfg.offline_eps is not None else cfg.eps_train


def prepare_batch(cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor, seed: int,
                  source: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch as the recipe trains on it: augmented, then with its D_noise and static-FGSM copies
    (on the source model) appended."""
    from ..data import random_flip, random_shift, truncated_normal_noise
    if cfg.augment != "none" and cfg.shift > 0:
        x = random_shift(x, cfg.shift, generator=mix_seed(seed, streams.AUGMENT))
    if cfg.augment == "shift-flip":
        x = random_flip(x, generator=mix_seed(seed, streams.AUGMENT, 1))
    extra_x, extra_y = [], []
    if cfg.noise_aug:
        extra_x.append(truncated_normal_noise(x, cfg.noise_eps / 2, generator=mix_seed(seed, streams.NOISE)))
        extra_y.append(y)
    if cfg.offline == "fgsm":
        extra_x.append(static_fgsm(source, x, y, offline_eps(cfg), mix_seed(seed, streams.STATIC_FGSM)))
        extra_y.append(y)
    if extra_x:
        x, y = torch.cat([x, *extra_x]), torch.cat([y, *extra_y])
    return x, y


def static_fgsm(source: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, seed: int) -> torch.Tensor:
    """Ensemble Adversarial Training's D_adv: FGSM on the static source model with a per-example
    step |N(0, (eps/2)^2)| truncated at eps."""
    from ..data import truncated_normal_noise
    size = truncated_normal_noise(torch.zeros(x.shape[0], device=x.device), eps / 2, generator=seed,
                                  clip=None).abs()
    leaf = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(F.cross_entropy(source(leaf), y, reduction="sum"), leaf)
    step = size.view(-1, *([1] * (x.dim() - 1))) * g.sign()
    return (x + step).clamp(0, 1).detach()


def adversarial_examples(cfg: TrainConfig, model: nn.Module, members: list[nn.Module] | None, x: torch.Tensor,
                         y: torch.Tensor, seed: int) -> torch.Tensor:
    """PGD examples on the fly; populations: each member on examples crafted on itself, stacked
    sample-major ``[K*B, ...]``."""
    from ..attacks import PGD

    def attack(target, s):
        return PGD(target, eps=cfg.eps_train, alpha=cfg.adv_alpha, steps=cfg.adv_steps,
                   random_start=cfg.adv_random_start, eot=cfg.adv_eot, eot_samples=cfg.adv_eot_samples,
                   seed=s, strategy=cfg.strategy)(x, y)

    if cfg.wrapper == "population":
        return torch.cat([attack(m, mix_seed(seed, streams.ADVERSARIAL, i)) for i, m in enumerate(members)])
    return attack(model, mix_seed(seed, streams.ADVERSARIAL))
