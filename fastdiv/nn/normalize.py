"""Input normalization inside the model, so that a classifier trained on normalized inputs takes the [0, 1]
images that the attacks perturb and clip (the torchvision / RobustBench convention).

>>> model = torch.nn.Sequential(fastdiv.nn.Normalize((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)), net)
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["Normalize"]


def _values(values, name: str) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        values = values.detach().flatten().tolist()
    elif isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]
    if not isinstance(values, Sequence) or not values or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
        raise ValueError(f"Normalize: {name} must be a finite number or a non-empty sequence of them (one per "
                         f"channel), got {values!r}")
    return torch.tensor([float(v) for v in values], dtype=torch.float64)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel (dim 1) of an input ``[B, C, ...]``.

    Args:
        mean, std: one number (every channel) or one per channel; ``std`` > 0.

    The constants are buffers (saved in the state dict, moved by ``.to()``), kept in float64 and cast to
    the input's dtype at each forward. The pullback is exact (a per-channel scale), so attacks on the
    wrapped model see the gradient with respect to the [0, 1] image.
    """

    def __init__(self, mean: float | Sequence[float] | torch.Tensor, std: float | Sequence[float] | torch.Tensor):
        super().__init__()
        mean_t, std_t = _values(mean, "mean"), _values(std, "std")
        if (std_t <= 0).any():
            raise ValueError(f"Normalize: std must be > 0, got {std_t.tolist()}")
        if len(mean_t) != len(std_t) and 1 not in (len(mean_t), len(std_t)):
            raise ValueError(f"Normalize: mean has {len(mean_t)} values and std {len(std_t)}; give one per channel "
                             "for both, or one number")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"Normalize: expected a floating-point batch [B, C, ...], got {got}")
        channels = max(len(self.mean), len(self.std))
        if channels != 1 and x.shape[1] != channels:
            raise ValueError(f"Normalize: {channels} channel constants for an input with {x.shape[1]} channels "
                             f"(shape {tuple(x.shape)})")
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = self.mean.to(device=x.device, dtype=x.dtype).view(shape)
        std = self.std.to(device=x.device, dtype=x.dtype).view(shape)
        return (x - mean) / std

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"
