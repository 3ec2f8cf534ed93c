"""Additive Gaussian noise layers: Random Self-Ensemble (RSE, Liu et al. 2018), a GradDiv baseline.

RSE puts a noise layer ``x + sigma * N(0, 1)`` before each convolution, with a larger standard
deviation on the network input (``sigma_init = 0.2``) than inside (``sigma_inner = 0.1``), and keeps
the noise at inference: the prediction is an ensemble over noise draws ("self-ensemble"). So
:class:`NoiseInjection` is active in train *and* eval mode.
"""
from __future__ import annotations

import torch

from .._checks import check_positive
from .sampling import RandomizedModule

__all__ = ["SIGMA_INIT", "SIGMA_INNER", "NoiseInjection"]

#: RSE's noise standard deviation on the network input and on inner layers (RSE defaults, CIFAR-10).
SIGMA_INIT = 0.2
SIGMA_INNER = 0.1


class NoiseInjection(RandomizedModule):
    """``x + sigma * eps`` with ``eps ~ N(0, 1)`` drawn independently for every element (RSE).

    Active in train and eval mode (RSE keeps its noise at inference and ensembles over it). Draws
    follow :mod:`fastdiv.nn.sampling`: fresh from the global RNG per forward outside a sampling context;
    inside one, sample model ``s`` has its own noise for every example and element, so the replicas of
    a batched forward are independent samples and equal the looped forward row for row. Under
    :func:`~fastdiv.nn.frozen_sample` the noise is pinned per batch position: a frozen noise model is a
    fixed function for a fixed batch size (row ``b`` always gets the same noise tensor).

    Args:
        sigma: noise standard deviation (> 0).
    """

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = check_positive(sigma, "sigma", "NoiseInjection")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.active_samples()
        if x.dim() == 0 or x.shape[0] % k:
            raise ValueError(f"NoiseInjection: in a batched sampling context the input's dim 0 must be {k} * batch "
                             f"(the batch replicated once per sample model), got shape {tuple(x.shape)}")
        noise = self.draw((x.shape[0] // k, *x.shape[1:]), like=x)
        return torch.add(x, noise.reshape(x.shape), alpha=self.sigma)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}"
