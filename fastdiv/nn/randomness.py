"""What randomness a model has, found by looking and by probing, and how its draws are made reproducible.

fastdiv's own layers (:class:`~fastdiv.nn.RandomizedModule`) draw their noise through the sampling
protocol of :mod:`fastdiv.nn.sampling`: seeded per sample model, batchable. Other models draw from the
*global* RNG inside ``forward``: torch dropout in train mode, Bayesian layers of other libraries
(bayesian-torch, torchbnn, blitz), ``x + sigma * torch.randn_like(x)`` in a user's own module. Looking at
the module types finds the first two kinds only; :func:`detect_randomness` also *probes*: it runs two
forwards of a few examples with the fastdiv layers pinned to one sample model and the global RNG seeded
differently, and calls the model stochastic when the outputs differ. The probe leaves no trace: the global
RNG states, the buffers (BatchNorm running statistics) and the model's modes are restored.

Randomness drawn from the global RNG cannot be batched (a layer that draws its weights once per forward
would share them between the replicas of a replicated batch), so such a model is evaluated sample by
sample, with the global RNG seeded per sample by :func:`seeded_global_rng` so that seeded runs repeat.

:func:`model_mode` sets the mode an attack or an evaluation runs the model in, including
``'mc-dropout'``: BatchNorm and everything else in eval mode, dropout layers active.
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref
from collections.abc import Iterator

import torch
from torch import nn

from .._seeds import mix_seed
from .sampling import has_unseeded_randomness, is_randomized, sampling

__all__ = ["MODEL_MODES", "PROBE_EXAMPLES", "Randomness", "detect_randomness", "is_stochastic", "model_mode",
           "one_sample", "reseeded_before_every_forward", "seeded_global_rng"]

#: How a model is run during an attack or an evaluation (see :func:`model_mode`).
MODEL_MODES = ("eval", "train", "keep", "mc-dropout")

#: Examples of the batch the probe forwards (two forwards each, no gradient).
PROBE_EXAMPLES = 4

# Two probe forwards count as different when some logit differs by more than this fraction of the logit
# scale (1 + max |logit|): well above the run-to-run noise of non-deterministic GPU kernels (atomics,
# split reductions: a few units in the last place), far below any noise a defense injects on purpose.
_PROBE_TOLERANCE = 1e-4

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@dataclasses.dataclass(frozen=True)
class Randomness:
    """The verdict on a model's randomness (true in a boolean context when the model is stochastic).

    fastdiv_layers: it has fastdiv randomized layers (seeded, batchable draws).
    global_rng: it draws from the global RNG (active torch dropout, or found by the probe).
    declared: the caller said whether it is stochastic (``stochastic=True|False``); no probe ran.
    reason: one sentence for reports and logs.
    """

    fastdiv_layers: bool
    global_rng: bool
    declared: bool
    reason: str

    @property
    def stochastic(self) -> bool:
        return self.fastdiv_layers or self.global_rng

    def __bool__(self) -> bool:
        return self.stochastic


def _cuda_indices(device: torch.device | str | None) -> list[int]:
    """The CUDA device index of ``device`` as a one-element list, or [] for a CPU device."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _seed_global(seed: int, cuda: list[int]) -> None:
    torch.random.default_generator.manual_seed(seed)
    for index in cuda:
        with torch.cuda.device(index):
            torch.cuda.manual_seed(seed)


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Inside the block the global RNG of the CPU (and of ``device`` if it is a CUDA device) is seeded
    with ``seed``; afterwards both are back in the state they had, as if the block had drawn nothing."""
    cuda = _cuda_indices(device)
    with torch.random.fork_rng(devices=cuda):
        _seed_global(seed, cuda)
        yield


@contextlib.contextmanager
def reseeded_before_every_forward(model: nn.Module, seed: int,
                                  device: torch.device | str | None = None) -> Iterator[None]:
    """As :func:`seeded_global_rng`, and the global RNG seeded with ``seed`` again before every forward of
    ``model``: a model that draws from it is pinned to one sample model (draws made once per forward, such
    as another library's Bayesian weights, exactly; per-element draws for each batch size)."""
    cuda = _cuda_indices(device)
    with seeded_global_rng(seed, device):
        handle = model.register_forward_pre_hook(lambda module, args: _seed_global(seed, cuda))
        try:
            yield
        finally:
            handle.remove()


@contextlib.contextmanager
def one_sample(model: nn.Module, num_samples: int, seed: int, index: int, randomness: Randomness,
               device: torch.device | str | None = None) -> Iterator[None]:
    """Sample model ``index`` of ``num_samples`` drawn from ``seed``, on a plain (not replicated) batch:
    the fastdiv layers pinned by :func:`~fastdiv.nn.sampling`, and, when ``randomness`` says the model
    draws from the global RNG, that RNG seeded per sample (on the CPU and ``device``) and restored after."""
    with sampling(model, num_samples, seed, index=index), (
            seeded_global_rng(mix_seed(seed, index), device) if randomness.global_rng else contextlib.nullcontext()):
        yield


@contextlib.contextmanager
def model_mode(model: nn.Module, mode: str) -> Iterator[nn.Module]:
    """Runs ``model`` in ``mode`` inside the block and restores every submodule's mode afterwards.

    'eval': everything in eval mode (torchattacks' default); 'train': everything in train mode (BatchNorm
    then uses and updates batch statistics); 'mc-dropout': eval mode except the dropout layers, which
    stay active (Monte Carlo dropout: BatchNorm uses its running statistics, dropout draws masks);
    'keep': the modes as they are.
    """
    if mode not in MODEL_MODES:
        raise ValueError(f"model_mode: mode must be one of {MODEL_MODES}, got {mode!r}")
    modes = [(m, m.training) for m in model.modules()]
    try:
        if mode != "keep":
            model.train(mode == "train")
        if mode == "mc-dropout":
            for m in model.modules():
                if isinstance(m, _DROPOUT):
                    m.train(True)
        yield model
    finally:
        for m, training in modes:
            m.training = training


# probe verdicts per model, valid while the modes of its submodules and the probe's device are unchanged
_PROBED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _probe_key(model: nn.Module, x: torch.Tensor) -> tuple:
    return tuple(m.training for m in model.modules()), x.device, x.dtype, tuple(x.shape[1:])


def _probe(model: nn.Module, x: torch.Tensor, seed: int) -> tuple[bool, float]:
    """(whether two forwards with differently seeded global RNGs differ, the largest logit difference)."""
    xs = x[:PROBE_EXAMPLES].detach()
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    outs = []
    try:
        with torch.no_grad(), sampling(model, 1, seed, index=0):
            for k in range(2):
                with seeded_global_rng(mix_seed(seed, k), x.device):
                    outs.append(model(xs))
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    a, b = outs
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape \
            or not a.is_floating_point():
        return False, 0.0  # not logits: the forward that follows raises the error that says so
    a, b = a.double().nan_to_num(), b.double().nan_to_num()
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    return diff > _PROBE_TOLERANCE * (1.0 + (float(a.abs().max()) if a.numel() else 0.0)), diff


def is_stochastic(model: nn.Module, x: torch.Tensor | None = None) -> bool:
    """Whether ``model``'s output depends on random draws: it contains a fastdiv randomized layer or an
    active torch dropout layer, or, given a batch ``x``, two forwards of its first examples differ
    (randomness drawn inside ``forward`` from the global RNG; :func:`detect_randomness` also says why)."""
    if x is None:
        return is_randomized(model) or has_unseeded_randomness(model)
    return detect_randomness(model, x).stochastic


def _probed(model: nn.Module, x: torch.Tensor, seed: int) -> tuple[bool, float]:
    """:func:`_probe`'s answer, cached on the model while its modes and the input's kind stay the same."""
    key = _probe_key(model, x)
    cached = _PROBED.get(model)
    if cached is None or cached[0] != key:
        cached = (key, _probe(model, x, seed))
        _PROBED[model] = cached
    return cached[1]


def detect_randomness(model: nn.Module, x: torch.Tensor | None = None, *,
                      stochastic: bool | Randomness | None = None, seed: int = 0) -> Randomness:
    """Whether ``model`` is stochastic in its current modes, and where its randomness comes from.

    Args:
        model: any ``nn.Module`` returning logits.
        x: a batch of inputs; its first :data:`PROBE_EXAMPLES` examples are used by the probe. Without
            it only the module types are looked at (fastdiv layers, active torch dropout).
        stochastic: the caller's declaration, which overrides the verdict: ``True`` (stochastic: a model
            without fastdiv layers is taken to draw from the global RNG, one with them is still probed
            for global-RNG draws besides), ``False`` (deterministic: one forward stands for every
            sample), ``None`` (detect). A :class:`Randomness` is returned as it is.
        seed: the seed of the probe's two global-RNG states.

    The probe runs at most once per model, mode and input shape (its verdict is cached on the model).
    """
    if isinstance(stochastic, Randomness):
        return stochastic
    if stochastic is not None and not isinstance(stochastic, bool):
        raise TypeError(f"stochastic must be True, False or None, got {type(stochastic).__name__}")
    layers = is_randomized(model)
    dropout = has_unseeded_randomness(model)
    if stochastic is False:
        return Randomness(False, False, True, "declared deterministic by the caller (stochastic=False)")
    if stochastic is True:
        global_rng = dropout or not layers or (x is not None and x.shape[0] > 0 and _probed(model, x, seed)[0])
        return Randomness(layers, global_rng, True, "declared stochastic by the caller (stochastic=True)")
    if dropout:
        return Randomness(layers, True, False, "active torch dropout layers (masks drawn from the global RNG)")
    if x is None or x.shape[0] == 0:
        reason = "fastdiv randomized layers" if layers else "no randomized layer or active dropout found"
        return Randomness(layers, False, False, reason)
    differs, diff = _probed(model, x, seed)
    if differs:
        return Randomness(layers, True, False, f"two forwards of the same input differ (largest logit difference "
                                               f"{diff:.3g}): randomness drawn from the global RNG")
    reason = ("fastdiv randomized layers (the probe found no other randomness)" if layers
              else "no randomized layer found and two forwards of the same input agree")
    return Randomness(layers, False, False, reason)
