"""The data augmentations of the training recipes: pure, seeded batch ops on any device."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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
