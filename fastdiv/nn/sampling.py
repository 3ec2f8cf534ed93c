"""How one forward pass evaluates n sample models at once, and how one sample model is pinned.

A *randomized* model (Bayesian weights, injected noise, a random-dispatch population, an
ensemble) is a distribution over deterministic *sample models*. fastdiv evaluates n of them in one
pass: the input batch is replicated n times along dim 0 (``[n*B, ...]``, sample-major) and every
randomized layer uses draw ``s`` for rows ``s*B:(s+1)*B``. The draws come from a
:class:`SampleState` that the context managers below install on every :class:`RandomizedModule`
of a model:

* :func:`sampling` (used by :func:`fastdiv.sample_input_grads` and the attacks) — ``num_samples``
  draws from ``seed``; ``index=None`` evaluates all of them on a replicated batch (the 'batched'
  strategy), ``index=i`` evaluates only draw ``i`` on a plain batch (the 'loop' strategy). Each
  layer draws the noise of sample ``s`` from its own generator seeded by ``(seed, layer ordinal,
  tag, s)``, so both strategies see identical samples and a loop forward draws only its own.
* :func:`frozen_sample` pins one sample model: every forward in the block, at any batch size and
  under any nested :func:`sampling`, uses the same draw ("[Attack]" against a fixed sample, and
  transferability between sample models).

Outside both, layers draw fresh noise from the global RNG on every forward (Adv-BNN / RSE
behaviour), as a one-sample model.

BatchNorm in train mode: in a replicated batch a plain BatchNorm would pool its statistics over
all n samples. Inside a batched :func:`sampling` block every train-mode ``_BatchNorm`` of the model
normalizes each sample's rows with their own statistics (as the loop does) and updates its running
statistics exactly as n sequential loop forwards would (momentum applied n times).
"""
from __future__ import annotations

import contextlib
import dataclasses
import types
from collections.abc import Iterator

import torch
from torch import nn

from .._seeds import mix_seed

__all__ = [
    "RandomizedModule", "SampleState", "frozen_sample", "has_unseeded_randomness", "is_randomized", "sample_models",
    "sampling", "supports_batched",
]

@dataclasses.dataclass(frozen=True)
class SampleState:
    """The draws a randomized layer uses in the current forward.

    num_samples: how many sample models the draws cover.
    seed: the base seed of the draws.
    index: ``None`` when the input holds all ``num_samples`` replicas (sample-major), else the one
        sample this forward evaluates.
    frozen: every sample is the same pinned sample model (draw 0), at any batch size.
    memo: the draws made so far under this state, reused by later forwards in the same block (they are a
        function of the state, so a second forward would draw the same values again): an attack that
        compares two inputs on the same sample models samples the weights once. One entry per layer and
        tag, the latest shape only; a frozen state shares it with the states nested in it.
    """

    num_samples: int
    seed: int
    index: int | None = None
    frozen: bool = False
    memo: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def active(self) -> int:
        """How many sample models the current input holds (its dim 0 is ``active * B``)."""
        return 1 if self.index is not None else self.num_samples


class RandomizedModule(nn.Module):
    """Base class of layers whose output depends on a random draw.

    Subclasses call :meth:`draw` for their noise and :meth:`active_samples` to split their input
    into ``[active, B, ...]``. ``_fastdiv_state`` and ``_fastdiv_ordinal`` are set by
    :func:`sampling` / :func:`frozen_sample`; they are plain attributes, not buffers, so they never
    reach a state dict.
    """

    _fastdiv_state: SampleState | None = None
    _fastdiv_ordinal: int = 0

    #: whether the layer evaluates a replicated batch with independent per-sample draws, so that
    #: :func:`fastdiv.sample_input_grads` may use the 'batched' strategy.
    supports_sample_batching: bool = True

    def active_samples(self) -> int:
        state = self._fastdiv_state
        return 1 if state is None else state.active

    def sample_state(self) -> SampleState | None:
        return self._fastdiv_state

    def draw(self, shape, *, like: torch.Tensor, kind: str = "normal", tag: int = 0) -> torch.Tensor:
        """Noise of shape ``[active_samples(), *shape]`` with ``like``'s device and dtype.

        ``kind`` is 'normal' (N(0, 1)) or 'uniform' (U[0, 1)). ``tag`` tells apart several draws of
        one layer in one forward. Inside :func:`sampling` the draw of sample ``s`` is a function of
        (seed, layer ordinal, tag, s) only, so the batched and looped strategies and repeated
        forwards agree, and a loop forward draws only its own sample.
        """
        shape = tuple(int(s) for s in shape)
        state = self._fastdiv_state
        sampler = torch.randn if kind == "normal" else torch.rand if kind == "uniform" else None
        if sampler is None:
            raise ValueError(f"{type(self).__name__}.draw: kind must be 'normal' or 'uniform', got {kind!r}")
        if state is None:
            return sampler((1, *shape), device=like.device, dtype=like.dtype)
        key = ("draw", self._fastdiv_ordinal, tag, kind)
        known = state.memo.get(key)
        if known is not None and known[0] == (shape, like.dtype, like.device):
            noise = known[1]
        else:
            noise = self._draw_samples(state, shape, like, kind, tag)
            state.memo[key] = ((shape, like.dtype, like.device), noise)
        if state.frozen:
            return noise.expand(state.active, *shape)
        return noise

    def _draw_samples(self, state: SampleState, shape: tuple[int, ...], like: torch.Tensor,
                      kind: str, tag: int) -> torch.Tensor:
        # one generator per sample model, seeded by (seed, layer ordinal, tag, sample): a loop
        # forward (index=i) draws only its own sample, the same values as row i of the batched draw
        if state.frozen:
            samples = (0,)
        else:
            samples = range(state.num_samples) if state.index is None else (state.index,)
        # fp32 draws for half-precision models: the same samples whatever the model dtype
        dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
        noise = torch.empty((len(samples), *shape), device=like.device, dtype=dtype)
        for row, s in zip(noise, samples):
            gen = torch.Generator(device=like.device)
            gen.manual_seed(mix_seed(state.seed, self._fastdiv_ordinal, tag, s))
            if kind == "normal":
                row.normal_(generator=gen)
            else:
                row.uniform_(generator=gen)
        return noise.to(like.dtype)


def is_randomized(model: nn.Module) -> bool:
    """Whether ``model`` contains a :class:`RandomizedModule`."""
    return any(isinstance(m, RandomizedModule) for m in model.modules())


_UNSEEDED_RANDOM = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def has_unseeded_randomness(model: nn.Module) -> bool:
    """Whether ``model`` has an active torch dropout layer: randomness the sampling contexts cannot seed."""
    return any(isinstance(m, _UNSEEDED_RANDOM) and m.training and m.p > 0 for m in model.modules())


def supports_batched(model: nn.Module) -> bool:
    """Whether :func:`fastdiv.sample_input_grads` can evaluate ``model``'s n samples in one batched
    pass with the same samples as the loop: every randomized layer supports sample batching and no
    torch dropout layer (unseeded randomness) is active."""
    return not has_unseeded_randomness(model) and not any(
        isinstance(m, RandomizedModule) and not m.supports_sample_batching for m in model.modules())


def _install(model: nn.Module, state: SampleState | None) -> list[tuple[RandomizedModule, SampleState | None]]:
    previous = []
    ordinal = 0
    for m in model.modules():
        if isinstance(m, RandomizedModule):
            previous.append((m, m._fastdiv_state))
            m._fastdiv_state = state
            m._fastdiv_ordinal = ordinal
            ordinal += 1
    return previous


def _restore(previous) -> None:
    for m, state in previous:
        m._fastdiv_state = state


def _grouped_batch_norm(bn: nn.modules.batchnorm._BatchNorm, num_samples: int):
    """A forward for ``bn`` that normalizes each of ``num_samples`` row groups with its own batch
    statistics and applies the running-statistics update of ``num_samples`` sequential forwards."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.shape[0] % num_samples:
            return type(self).forward(self, x)
        if self.momentum is None:
            raise NotImplementedError(
                f"{type(self).__name__}(momentum=None) (cumulative averaging) is not supported in a "
                "sample-batched forward; use strategy='loop' or a numeric momentum")
        self._check_input_dim(x)
        b = x.shape[0] // num_samples
        xs = x.reshape(num_samples, b, *x.shape[1:])
        dims = [1] + list(range(3, xs.dim()))
        count = b * (xs[0, 0, 0].numel() if xs.dim() > 3 else 1)
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                             f"{list(x.shape)} split into {num_samples} samples")
        mean = xs.mean(dim=dims, keepdim=True)
        var = xs.var(dim=dims, unbiased=False, keepdim=True)
        shape = [1, 1, -1] + [1] * (xs.dim() - 3)
        y = (xs - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                m = float(self.momentum)
                mean_s = mean.reshape(num_samples, -1).to(self.running_mean.dtype)
                var_s = (var * (count / (count - 1))).reshape(num_samples, -1).to(self.running_var.dtype)
                for s in range(num_samples):  # n tiny [C] updates, the order of n sequential forwards
                    self.running_mean.mul_(1 - m).add_(mean_s[s], alpha=m)
                    self.running_var.mul_(1 - m).add_(var_s[s], alpha=m)
                self.num_batches_tracked.add_(num_samples)
        return y.reshape(x.shape)

    return types.MethodType(forward, bn)


@contextlib.contextmanager
def _grouped_batch_norms(model: nn.Module, num_samples: int):
    patched = []
    if num_samples > 1:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                patched.append((m, m.__dict__.get("forward")))
                m.forward = _grouped_batch_norm(m, num_samples)
    try:
        yield
    finally:
        for m, old in patched:
            if old is None:
                del m.forward
            else:
                m.forward = old


def _check_seed(seed, fn: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{fn}: seed must be an int, got {type(seed).__name__}")
    return seed


def _frozen_state(model: nn.Module) -> SampleState | None:
    for m in model.modules():
        if isinstance(m, RandomizedModule) and m._fastdiv_state is not None and m._fastdiv_state.frozen:
            return m._fastdiv_state
    return None


@contextlib.contextmanager
def sampling(model: nn.Module, num_samples: int, seed: int, index: int | None = None) -> Iterator[SampleState]:
    """Evaluate ``num_samples`` sample models of ``model`` drawn from ``seed``.

    With ``index=None`` feed the model the batch replicated ``num_samples`` times along dim 0
    (sample-major, ``x.repeat(num_samples, ...)``): rows ``s*B:(s+1)*B`` of the output belong to sample
    ``s``. With ``index=i`` feed the plain batch: the output is sample ``i`` alone, identical to
    those rows of the batched forward. Inside an enclosing :func:`frozen_sample` every sample is
    the pinned sample model.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"sampling: num_samples must be an int >= 1, got {num_samples!r}")
    _check_seed(seed, "sampling")
    if index is not None and not (isinstance(index, int) and 0 <= index < num_samples):
        raise ValueError(f"sampling: index must be None or an int in [0, {num_samples}), got {index!r}")
    frozen = _frozen_state(model)
    if frozen is not None:
        state = dataclasses.replace(frozen, num_samples=num_samples, index=index)
    else:
        state = SampleState(num_samples=num_samples, seed=seed, index=index)
    previous = _install(model, state)
    try:
        with _grouped_batch_norms(model, state.num_samples if index is None else 1):
            yield state
    finally:
        _restore(previous)


@contextlib.contextmanager
def frozen_sample(model: nn.Module, seed: int = 0) -> Iterator[SampleState]:
    """Pin one sample model of ``model``: inside the block every forward (any batch size, repeated
    calls, nested :func:`sampling`) uses the same draw, determined by ``seed``.

    >>> with fastdiv.nn.frozen_sample(model, seed=3):
    ...     x_adv = fastdiv.attacks.PGD(model, eot='fixed')(x, y)
    """
    state = SampleState(num_samples=1, seed=_check_seed(seed, "frozen_sample"), frozen=True)
    previous = _install(model, state)
    try:
        yield state
    finally:
        _restore(previous)


def sample_models(model: nn.Module, k: int, seed: int = 0) -> Iterator[int]:
    """Yield ``k`` times with ``model`` pinned to a different sample model each time (seeds derived
    from ``seed``); yields the index of the sample.

    >>> for i in fastdiv.nn.sample_models(model, 5):
    ...     preds[i] = model(x).argmax(1)
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"sample_models: k must be an int >= 1, got {k!r}")
    _check_seed(seed, "sample_models")
    for i in range(k):
        with frozen_sample(model, seed=mix_seed(seed, i)):
            yield i
