"""Bayesian layers with Gaussian mean-field weights (Adv-BNN, Liu et al. 2019; the GradDiv baseline).

Every weight and bias ``w`` has a learned mean ``mu`` and log standard deviation ``log_sigma``;
a forward uses ``w = mu + exp(log_sigma) * eps`` with ``eps ~ N(0, 1)`` (the reparameterization
trick). ``log_sigma`` starts at ``log(sigma_init)`` (default ``sigma_init = sigma0``), ``mu`` like
the corresponding ``torch.nn`` layer. The prior is ``N(0, sigma0^2)`` for every weight and bias and
:func:`kl_divergence` is the closed form

    KL(N(mu, s^2) || N(0, s0^2)) = log(s0 / s) + (s^2 + mu^2) / (2 s0^2) - 1/2

summed over all weights and biases of all Bayesian layers of a model.

Draws follow :mod:`fastdiv.nn.sampling`: outside a sampling context every forward draws fresh
weights from the global RNG (one weight sample shared by the whole batch, as Adv-BNN does); inside
a batched :func:`~fastdiv.nn.sampling` block the input holds ``k`` replicas of the batch
(``[k*B, ...]``, sample-major) and replica ``s`` uses weight draw ``s``. The ``k`` weight samples are
applied in one kernel call: a batched matmul for :class:`BayesLinear` and one grouped convolution
(``groups = k``) for :class:`BayesConv2d`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from .._checks import check_positive
from .sampling import RandomizedModule

__all__ = ["BayesBatchNorm2d", "BayesConv2d", "BayesLinear", "BayesianLayer", "gaussian_kl", "kl_divergence"]


def gaussian_kl(mu: torch.Tensor, log_sigma: torch.Tensor, sigma0: float) -> torch.Tensor:
    """Elementwise ``KL(N(mu, exp(log_sigma)^2) || N(0, sigma0^2))`` (same shape as ``mu``)."""
    return (math.log(sigma0) - log_sigma + (torch.exp(2 * log_sigma) + mu * mu) / (2 * sigma0 * sigma0) - 0.5)


def _check_count(value, name: str, fn: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{fn}: {name} must be an int >= {minimum}, got {value!r}")
    return value


class BayesianLayer(RandomizedModule):
    """Base class of the Bayesian layers: Gaussian parameters registered in pairs
    ``<name>_mu`` / ``<name>_log_sigma`` with prior ``N(0, sigma0^2)``.

    Subclasses call :meth:`_gaussian` in ``__init__`` and :meth:`sample` in ``forward``.
    """

    def __init__(self, sigma0: float, sigma_init: float | None) -> None:
        super().__init__()
        fn = type(self).__name__
        self.sigma0 = check_positive(sigma0, "sigma0", fn)
        self.sigma_init = self.sigma0 if sigma_init is None else check_positive(sigma_init, "sigma_init", fn)
        self._gaussians: list[str] = []

    def _gaussian(self, name: str, shape: tuple[int, ...]) -> None:
        self.register_parameter(f"{name}_mu", nn.Parameter(torch.empty(shape)))
        self.register_parameter(f"{name}_log_sigma", nn.Parameter(torch.empty(shape)))
        self._gaussians.append(name)

    def gaussians(self):
        """``(name, mu, log_sigma)`` of every Gaussian parameter of the layer."""
        for name in self._gaussians:
            yield name, getattr(self, f"{name}_mu"), getattr(self, f"{name}_log_sigma")

    def _reset_log_sigma(self) -> None:
        with torch.no_grad():
            for _, _, log_sigma in self.gaussians():
                log_sigma.fill_(math.log(self.sigma_init))

    def sample(self, name: str, tag: int) -> torch.Tensor:
        """``[k, *shape]`` draws ``mu + exp(log_sigma) * eps`` of Gaussian parameter ``name``, one per
        active sample model (``k = self.active_samples()``)."""
        mu, log_sigma = getattr(self, f"{name}_mu"), getattr(self, f"{name}_log_sigma")
        state = self.sample_state()
        # a draw without a graph is reused by later forwards under the same sampling state (see
        # SampleState.memo) while the parameters are unchanged (their version counters)
        reusable = state is not None and not (torch.is_grad_enabled() and (mu.requires_grad or log_sigma.requires_grad))
        key = ("gaussian", self._fastdiv_ordinal, name, tag)
        version = tuple((t.data_ptr(), t._version, t.dtype) for t in (mu, log_sigma))
        known = state.memo.get(key) if reusable else None
        if known is not None and known[0] == version and known[1].shape[0] == self.active_samples():
            return known[1]
        eps = self.draw(mu.shape, like=mu, tag=tag)
        value = torch.addcmul(mu, torch.exp(log_sigma), eps)
        if reusable:
            state.memo[key] = (version, value)
        return value

    def kl(self) -> torch.Tensor:
        """Closed-form ``KL(q || N(0, sigma0^2))`` of this layer, summed over its weights and biases."""
        total = None
        for _, mu, log_sigma in self.gaussians():
            part = gaussian_kl(mu, log_sigma, self.sigma0).sum()
            total = part if total is None else total + part
        return total

    def _split(self, x: torch.Tensor) -> int:
        k = self.active_samples()
        if x.dim() == 0 or x.shape[0] % k:
            raise ValueError(f"{type(self).__name__}: in a batched sampling context the input's dim 0 must be "
                             f"{k} * batch (the batch replicated once per sample model), got shape {tuple(x.shape)}")
        return k


class BayesLinear(BayesianLayer):
    """Bayesian ``nn.Linear``: ``y = x W^T + b`` with ``W ~ N(weight_mu, exp(weight_log_sigma)^2)``
    and the bias likewise (Adv-BNN's RandLinear).

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        sigma0: prior standard deviation (> 0); GradDiv uses 0.05 (MNIST), 0.1 (CIFAR-10), 0.15 (STL-10).
        sigma_init: initial posterior standard deviation (default ``sigma0``: ``log_sigma = log sigma0``).

    Input ``[N, *, in_features]``; in a batched sampling context ``N = k * B`` and rows
    ``s*B:(s+1)*B`` use weight draw ``s`` (one ``torch.baddbmm`` over the ``k`` draws).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, sigma0: float = 0.1,
                 sigma_init: float | None = None) -> None:
        super().__init__(sigma0, sigma_init)
        self.in_features = _check_count(in_features, "in_features", "BayesLinear")
        self.out_features = _check_count(out_features, "out_features", "BayesLinear")
        self.has_bias = bool(bias)
        self._gaussian("weight", (out_features, in_features))
        if self.has_bias:
            self._gaussian("bias", (out_features,))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # mu as nn.Linear.reset_parameters: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias
        nn.init.kaiming_uniform_(self.weight_mu, a=math.sqrt(5))
        if self.has_bias:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias_mu, -bound, bound)
        self._reset_log_sigma()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"BayesLinear: expected input [N, *, {self.in_features}], got shape {tuple(x.shape)}")
        k = self._split(x)
        weight = self.sample("weight", 0)
        bias = self.sample("bias", 1) if self.has_bias else None
        if k == 1:
            return F.linear(x, weight[0], None if bias is None else bias[0])
        rows = x.reshape(k, -1, self.in_features)
        if bias is None:
            out = torch.bmm(rows, weight.transpose(1, 2))
        else:
            out = torch.baddbmm(bias.unsqueeze(1), rows, weight.transpose(1, 2))
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}, "
                f"sigma0={self.sigma0}")


class BayesConv2d(BayesianLayer):
    """Bayesian ``nn.Conv2d`` (Adv-BNN's RandConv2d): kernel and bias drawn as in :class:`BayesLinear`.

    Args: as ``nn.Conv2d`` (``padding`` may be an int, a pair, 'valid' or 'same'; zero padding only),
    plus ``sigma0`` (prior standard deviation, > 0) and ``sigma_init`` (initial posterior standard
    deviation, default ``sigma0``).

    In a batched sampling context the ``k`` kernels are applied by one grouped convolution: the input
    ``[k*B, C, H, W]`` is viewed as ``[B, k*C, H, W]`` and convolved with the ``[k*out, C/groups, kh, kw]``
    stacked kernels, ``groups = k * groups``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, sigma0: float = 0.1, sigma_init: float | None = None) -> None:
        super().__init__(sigma0, sigma_init)
        fn = "BayesConv2d"
        self.in_channels = _check_count(in_channels, "in_channels", fn)
        self.out_channels = _check_count(out_channels, "out_channels", fn)
        self.groups = _check_count(groups, "groups", fn)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"{fn}: in_channels ({in_channels}) and out_channels ({out_channels}) must be "
                             f"divisible by groups ({groups})")
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        for name, value in (("kernel_size", self.kernel_size), ("stride", self.stride), ("dilation", self.dilation)):
            if len(value) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
                raise ValueError(f"{fn}: {name} must be a positive int or a pair of them, got {value!r}")
        if isinstance(padding, str):
            if padding not in ("valid", "same"):
                raise ValueError(f"{fn}: padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError(f"{fn}: padding='same' needs stride 1, got stride={self.stride}")
            self.padding = padding
        else:
            self.padding = _pair(padding)
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in self.padding):
                raise ValueError(f"{fn}: padding must be a non-negative int or a pair of them, got {padding!r}")
        self.has_bias = bool(bias)
        self._gaussian("weight", (out_channels, in_channels // groups, *self.kernel_size))
        if self.has_bias:
            self._gaussian("bias", (out_channels,))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # mu as nn.Conv2d.reset_parameters
        nn.init.kaiming_uniform_(self.weight_mu, a=math.sqrt(5))
        if self.has_bias:
            fan_in = self.weight_mu[0].numel()
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias_mu, -bound, bound)
        self._reset_log_sigma()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"BayesConv2d: expected input [N, {self.in_channels}, H, W], got shape {tuple(x.shape)}")
        k = self._split(x)
        weight = self.sample("weight", 0)
        bias = self.sample("bias", 1) if self.has_bias else None
        if k == 1:
            return F.conv2d(x, weight[0], None if bias is None else bias[0], self.stride, self.padding,
                            self.dilation, self.groups)
        b, (c, h, w) = x.shape[0] // k, x.shape[1:]
        # [k*B, C, H, W] -> [B, k*C, H, W]: sample s's channels form groups s*g .. (s+1)*g - 1
        xg = x.reshape(k, b, c, h, w).transpose(0, 1).reshape(b, k * c, h, w)
        out = F.conv2d(xg, weight.reshape(k * self.out_channels, *weight.shape[2:]),
                       None if bias is None else bias.reshape(-1), self.stride, self.padding, self.dilation,
                       k * self.groups)
        oh, ow = out.shape[2:]
        out = out.reshape(b, k, self.out_channels, oh, ow).transpose(0, 1)
        return out.reshape(k * b, self.out_channels, oh, ow)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s + f", bias={self.has_bias}, sigma0={self.sigma0}"


class BayesBatchNorm2d(BayesianLayer):
    """BatchNorm2d with a Bayesian affine transform (Adv-BNN's RandBatchNorm2d): the batch (or running)
    normalization of an inner ``nn.BatchNorm2d(affine=False)`` followed by ``y * gamma + beta`` with
    ``gamma ~ N(weight_mu, ...)``, ``beta ~ N(bias_mu, ...)`` drawn per sample model.

    ``weight_mu`` starts at 1 and ``bias_mu`` at 0 (the ``nn.BatchNorm2d`` defaults; Adv-BNN draws
    ``weight_mu ~ U(0, 1)``); the prior of both is ``N(0, sigma0^2)`` as in Adv-BNN. The statistics live
    in ``self.norm``, a plain ``_BatchNorm``, so a sample-batched forward in train mode normalizes
    each sample's rows with their own statistics exactly like the loop (:mod:`fastdiv.nn.sampling`).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 track_running_stats: bool = True, sigma0: float = 0.1, sigma_init: float | None = None) -> None:
        super().__init__(sigma0, sigma_init)
        self.num_features = _check_count(num_features, "num_features", "BayesBatchNorm2d")
        self.norm = nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=False,
                                   track_running_stats=track_running_stats)
        self._gaussian("weight", (num_features,))
        self._gaussian("bias", (num_features,))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.norm.reset_running_stats()
        with torch.no_grad():
            self.weight_mu.fill_(1.0)
            self.bias_mu.zero_()
        self._reset_log_sigma()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"BayesBatchNorm2d: expected input [N, {self.num_features}, H, W], got shape "
                             f"{tuple(x.shape)}")
        k = self._split(x)
        y = self.norm(x)
        gamma = self.sample("weight", 0)
        beta = self.sample("bias", 1)
        shape = (k, 1, self.num_features, 1, 1)
        out = torch.addcmul(beta.view(shape), y.reshape(k, -1, *y.shape[1:]), gamma.view(shape))
        return out.reshape(y.shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, sigma0={self.sigma0}"


def kl_divergence(model: nn.Module) -> torch.Tensor:
    """Closed-form KL divergence of the posterior of every :class:`BayesianLayer` of ``model`` to its
    prior, summed over layers: a scalar tensor with gradient to the ``mu``/``log_sigma`` parameters.

    0 (a scalar zero on the model's device) when ``model`` has no Bayesian layer. Adv-BNN's objective
    adds ``alpha_KL * kl_divergence(model) / N_train`` to the loss.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"kl_divergence: model must be an nn.Module, got {type(model).__name__}")
    total = None
    for m in model.modules():
        if isinstance(m, BayesianLayer):
            part = m.kl()
            if part is not None:
                total = part if total is None else total + part
    if total is None:
        ref = next(model.parameters(), None)
        return torch.zeros((), device=None if ref is None else ref.device,
                           dtype=torch.float32 if ref is None or not ref.is_floating_point() else ref.dtype)
    return total
