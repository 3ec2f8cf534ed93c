"""The :class:`Attack` base class: argument checks, model mode, devices, randomness, EOT modes and
restarts shared by every attack in :mod:`fastdiv.attacks`.

Against a randomized model (a distribution over sample models, :mod:`fastdiv.nn.sampling`) every
attack runs in one of three EOT modes (GradDiv, §5):

* ``eot='fixed'`` — "[Attack]": one sample model, drawn at the start of the call, is used for every
  gradient (and every query) of the whole attack, restarts included;
* ``eot='one'`` — "EOT¹-[Attack]": a fresh sample model at every step (n = 1);
* ``eot='mean'`` — "EOT-[Attack]": ``eot_samples`` fresh sample models at every step, the step uses
  their mean gradient (score-based attacks: their mean loss).

The per-step sample seeds come from a ``torch.Generator`` seeded with ``seed`` at the start of every
call (so a call is reproducible), or from the global RNG when ``seed`` is None.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..grads import STRATEGIES, per_example_loss, resolve_seed, sample_input_grads, sample_logits
from ..nn.randomness import MODEL_MODES, Randomness, detect_randomness, model_mode

__all__ = ["EOT_MODES", "MODEL_MODES", "NORMS", "Attack", "cw_loss", "dlr_loss", "ensemble_margin"]

EOT_MODES = ("mean", "one", "fixed")
NORMS = ("linf", "l2")

#: how far outside [0, 1] an input may lie (float rounding of a normalization) before it is rejected
RANGE_TOLERANCE = 1e-6


# ------------------------------------------------------------------------------------------------
# Losses the attacks ascend (per example, [N]); usable as ``loss=`` of fastdiv.sample_input_grads.
# ------------------------------------------------------------------------------------------------


def _other_max(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``max_{j != y} z_j`` per row."""
    mask = nn.functional.one_hot(y, logits.shape[1]).bool()
    return logits.masked_fill(mask, float("-inf")).amax(1)


class cw_loss:
    """Carlini–Wagner hinge to ascend: ``min(max_{j≠y} z_j − z_y, confidence)`` on logits ``z``.

    The attack pushes each example until some wrong class beats the true one by ``confidence``
    (κ); beyond that the loss is flat. ``cw_loss(0.0)`` is ``sample_input_grads``' ``loss='cw'``.
    """

    def __init__(self, confidence: float = 0.0) -> None:
        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not (
                0 <= confidence < math.inf):
            raise ValueError(f"cw_loss: confidence must be a finite number >= 0, got {confidence!r}")
        self.confidence = float(confidence)

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        true = logits.gather(1, y[:, None]).squeeze(1)
        return (_other_max(logits, y) - true).clamp(max=self.confidence)

    def __repr__(self) -> str:
        return f"cw_loss(confidence={self.confidence:g})"


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of Logits Ratio to ascend (Croce & Hein 2020, eq. 6):
    ``−(z_y − max_{j≠y} z_j) / (z_π1 − z_π3 + 1e−12)`` with ``z_π1 ≥ z_π2 ≥ z_π3`` the sorted logits.

    Invariant to shifting and scaling the logits; needs at least 3 classes.
    """
    if logits.shape[1] < 3:
        raise ValueError(f"dlr_loss: the DLR loss needs at least 3 classes, the model has {logits.shape[1]}")
    top = logits.topk(3, dim=1).values
    true = logits.gather(1, y[:, None]).squeeze(1)
    return -(true - _other_max(logits, y)) / (top[:, 0] - top[:, 2] + 1e-12)


def ensemble_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``max_{j≠y} p̄_j − p̄_y`` with ``p̄`` the softmax averaged over the sample models
    (``logits [n, B, C]``): positive exactly when the ensemble prediction is wrong."""
    probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1).mean(0)
    true = probs.gather(1, y[:, None]).squeeze(1)
    return _other_max(probs, y) - true


# ------------------------------------------------------------------------------------------------
# Randomness of one call
# ------------------------------------------------------------------------------------------------


class _Rng:
    """The randomness of one attack call: a CPU ``torch.Generator`` seeded with ``seed`` (draws are
    made on the CPU and moved, so a seeded call gives the same result on every device), or the
    global RNG of the data's device when ``seed`` is None."""

    def __init__(self, seed: int | None) -> None:
        self.gen = None if seed is None else torch.Generator().manual_seed(seed)

    def seed(self) -> int:
        return resolve_seed(self.gen)

    def _draw(self, fn, shape, like: torch.Tensor) -> torch.Tensor:
        if self.gen is None:
            return fn(shape, device=like.device, dtype=like.dtype)
        return fn(shape, generator=self.gen, dtype=like.dtype).to(like.device)

    def uniform(self, shape, like: torch.Tensor) -> torch.Tensor:
        """U[0, 1) of ``like``'s dtype and device."""
        return self._draw(torch.rand, shape, like)

    def normal(self, shape, like: torch.Tensor) -> torch.Tensor:
        return self._draw(torch.randn, shape, like)

    def randint(self, high: int, shape, device) -> torch.Tensor:
        """Integers in ``[0, high)``, int64 on ``device``."""
        if self.gen is None:
            return torch.randint(0, high, shape, device=device)
        return torch.randint(0, high, shape, generator=self.gen).to(device)


class _Call:
    """Per-call state handed to :meth:`Attack._attack`: the RNG, the seed of the fixed sample and the
    model's randomness (resolved once per call)."""

    def __init__(self, rng: _Rng, fixed_seed: int, randomness: Randomness) -> None:
        self.rng = rng
        self.fixed_seed = fixed_seed
        self.randomness = randomness


# ------------------------------------------------------------------------------------------------
# Argument checks
# ------------------------------------------------------------------------------------------------


def _check_number(value, name: str, fn: str, *, minimum: float = 0.0, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a number, got {type(value).__name__}")
    ok = (minimum < value < math.inf) if strict else (minimum <= value < math.inf)
    if not ok:
        raise ValueError(f"{fn}: {name} must be a finite number {'>' if strict else '>='} {minimum:g}, "
                         f"got {value!r}")
    return float(value)


def _check_int(value, name: str, fn: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{fn}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_choice(value, name: str, fn: str, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{fn}: {name} must be one of {tuple(choices)}, got {value!r}")
    return value


def _check_loss(loss, fn: str, choices=("ce", "logit", "cw")):
    if callable(loss):
        return loss
    return _check_choice(loss, "loss", fn, choices)


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return fallback


# ------------------------------------------------------------------------------------------------
# The base class
# ------------------------------------------------------------------------------------------------


class Attack:
    """Base class of the fastdiv attacks (torchattacks-style): ``x_adv = atk(images, labels)``.

    Args (common to every attack; each subclass adds its own, see its docstring):
        model: the ``nn.Module`` to attack; it returns logits ``[N, C]``. A randomized model
            (:mod:`fastdiv.nn`) is attacked through its sample models (see ``eot``).
        eps: radius of the threat model (ℓ∞ or ℓ2 ball around the clean input), >= 0.
        eot: 'mean' (EOT: ``eot_samples`` fresh sample models per step, mean gradient), 'one'
            (EOT¹: one fresh sample model per step) or 'fixed' ([Attack]: one sample model for the
            whole call). Irrelevant for a deterministic model (all three give the same result).
        eot_samples: sample models per step for ``eot='mean'`` (>= 1; ignored otherwise).
        seed: int seed of the call's randomness (random starts, sample models): every call with the
            same inputs gives the same result. None: the global RNG.
        strategy: how the n sample gradients are computed, passed to
            :func:`fastdiv.sample_input_grads`: 'batched', 'loop' or 'auto' (the batched pass on a
            GPU where the model supports it, the loop on the CPU, where it is faster). Both give the
            same result for the same seed.
        model_mode: 'eval' (default, as torchattacks: the model is put in eval mode during the
            attack), 'mc-dropout' (eval mode with the dropout layers left active: Monte Carlo dropout,
            BatchNorm on its running statistics), 'train' (train mode; BatchNorm then uses and updates
            batch statistics), or 'keep' (leave the mode alone). The mode of every submodule is
            restored afterwards (:func:`fastdiv.nn.model_mode`).
        stochastic: ``None`` (default) detects whether the model is stochastic in that mode, once per
            call (:func:`fastdiv.nn.detect_randomness`: its layers, then two forwards of a few examples
            that must agree); ``True`` / ``False`` declares it. A model that draws from the global RNG
            (torch dropout, other libraries' Bayesian layers, ``torch.randn`` in ``forward``) gets
            real independent forwards per sample, with the global RNG seeded from ``seed``; for
            ``eot='fixed'`` it is re-seeded with the fixed sample's seed before every forward, which pins
            draws made once per forward (another library's Bayesian weights) exactly and per-element
            draws (dropout masks, input noise) for each batch size.

    Call: ``images`` ``[B, *input_shape]`` floating point in [0, 1] (NCHW for images), ``labels``
    ``[B]`` integers in ``[0, C)``. Returns the adversarial batch (same shape and dtype, on
    ``images``' device; computed on the model's device). Inputs are never modified; an empty batch
    returns an empty result.
    """

    #: attacks whose gradient steps use the ℓ∞ / ℓ2 geometry
    norms: tuple[str, ...] = NORMS
    #: input dimensions an attack needs (Square: 4, NCHW)
    min_input_dims: int = 2

    def __init__(self, model: nn.Module, eps: float, *, norm: str = "linf", eot: str = "mean",
                 eot_samples: int = 10, seed: int | None = None, strategy: str = "auto",
                 model_mode: str = "eval", stochastic: bool | None = None) -> None:
        fn = self.name
        if not isinstance(model, nn.Module):
            raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.eps = _check_number(eps, "eps", fn)
        # torchattacks and AutoAttack spell the norms 'Linf' / 'L2'
        self.norm = _check_choice(norm.lower() if isinstance(norm, str) else norm, "norm", fn, self.norms)
        self.eot = _check_choice(eot, "eot", fn, EOT_MODES)
        self.eot_samples = _check_int(eot_samples, "eot_samples", fn)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"{fn}: seed must be an int or None, got {type(seed).__name__}")
        self.seed = seed
        self.strategy = _check_choice(strategy, "strategy", fn, STRATEGIES)
        self.model_mode = _check_choice(model_mode, "model_mode", fn, MODEL_MODES)
        if stochastic is not None and not isinstance(stochastic, bool):
            raise TypeError(f"{fn}: stochastic must be True, False or None, got {type(stochastic).__name__}")
        self.stochastic = stochastic

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def num_samples(self) -> int:
        """Sample models per gradient (or query): ``eot_samples`` for eot='mean', else 1."""
        return self.eot_samples if self.eot == "mean" else 1

    def __repr__(self) -> str:
        skip = {"model"}
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k not in skip and not k.startswith("_"))
        return f"{self.name}({args})"

    # -- the call ----------------------------------------------------------------------------------

    def _check_call(self, images, labels) -> None:
        fn = self.name
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TypeError(f"{fn}: images must be a floating-point tensor [B, ...] in [0, 1], got "
                            f"{images.dtype if isinstance(images, torch.Tensor) else type(images).__name__}")
        if images.dim() < self.min_input_dims:
            shape = "[B, C, H, W]" if self.min_input_dims == 4 else "[B, *input_shape]"
            raise ValueError(f"{fn}: images must be a batch {shape}, got shape {tuple(images.shape)}")
        if images.numel():
            lo, hi = float(images.min()), float(images.max())
            if not (lo >= -RANGE_TOLERANCE and hi <= 1 + RANGE_TOLERANCE):
                raise ValueError(f"{fn}: images must lie in [0, 1] (scale them before the attack; "
                                 f"normalize inside the model), got values in [{lo:g}, {hi:g}]")
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() \
                or labels.dtype == torch.bool:
            raise TypeError(f"{fn}: labels must be an integer tensor [B], got "
                            f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"{fn}: labels must have shape [{images.shape[0]}] (one label per image), got "
                             f"{tuple(labels.shape)}")
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError(f"{fn}: labels must be class indices >= 0, got min {int(labels.min())}")

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self._check_call(images, labels)
        if images.shape[0] == 0:
            return images.detach().clone()
        device = _model_device(self.model, images.device)
        x0 = images.detach().to(device)
        y = labels.detach().to(device=device, dtype=torch.long)
        with model_mode(self.model, self.model_mode):
            randomness = detect_randomness(self.model, x0, stochastic=self.stochastic)
            rng = _Rng(self.seed)
            # drawn first in every mode, so that the random starts of all modes agree
            call = _Call(rng, rng.seed(), randomness)
            with torch.no_grad():
                x_adv = self._attack(x0, y, call)
        return x_adv.detach().to(images.device)

    def _attack(self, x0: torch.Tensor, y: torch.Tensor, call: _Call) -> torch.Tensor:
        """The attack proper on the model's device, under no_grad. Overridden."""
        raise NotImplementedError

    # -- helpers for subclasses ---------------------------------------------------------------------

    def _step_seed(self, call: _Call) -> int:
        """Seed of the sample models of the next step (the fixed one for eot='fixed')."""
        return call.fixed_seed if self.eot == "fixed" else call.rng.seed()

    def _wrap_errors(self, fn: Callable, *args, **kwargs):
        """Model-dependent checks (label range, logits shape) surface inside the first forward:
        re-raised with the attack's name in front."""
        try:
            return fn(*args, **kwargs)
        except ValueError as err:
            raise ValueError(f"{self.name}: {err}") from None

    def _grads(self, x: torch.Tensor, y: torch.Tensor, call: _Call, loss, num_samples: int | None = None):
        """``(grads [n, B, ...], logits [n, B, C])`` of the next step's sample models."""
        n = self.num_samples if num_samples is None else num_samples
        return self._wrap_errors(sample_input_grads, self.model, x, y, n, loss=loss, strategy=self.strategy,
                                 generator=self._step_seed(call), stochastic=call.randomness)

    def _sample_logits(self, x: torch.Tensor, call: _Call, seed: int, num_samples: int | None = None
                       ) -> torch.Tensor:
        """Logits ``[n, B, C]`` of n sample models drawn from ``seed`` (no gradient): one forward over
        the replicated batch or n forwards, chosen by ``strategy`` as sample_input_grads does."""
        n = self.num_samples if num_samples is None else num_samples
        return sample_logits(self.model, x, n, seed=seed, strategy=self.strategy, stochastic=call.randomness,
                             fn=self.name)

    def _check_labels(self, y: torch.Tensor, classes: int) -> None:
        if y.numel() and int(y.max()) >= classes:
            raise ValueError(f"{self.name}: labels must be in [0, {classes}) for a model with {classes} classes, "
                             f"got max {int(y.max())}")

    def _margin(self, x: torch.Tensor, y: torch.Tensor, call: _Call, seed: int) -> torch.Tensor:
        """Ensemble margin ``max_{j≠y} p̄_j − p̄_y`` over ``num_samples`` sample models from ``seed``
        (> 0: the attack succeeded on that example)."""
        logits = self._sample_logits(x, call, seed)
        self._check_labels(y, logits.shape[-1])
        return ensemble_margin(logits, y)

    def _random_start(self, x0: torch.Tensor, call: _Call) -> torch.Tensor:
        """A uniformly random point of the ε-ball around ``x0`` (ℓ∞: U(−ε, ε) per element; ℓ2: a
        uniform direction scaled by ε·U(0, 1), as torchattacks' PGDL2), clipped to [0, 1]."""
        if self.norm == "linf":
            delta = (2 * call.rng.uniform(x0.shape, x0) - 1) * self.eps
        else:
            z = call.rng.normal(x0.shape, x0)
            norms = z.flatten(1).norm(dim=1).clamp_min(torch.finfo(z.dtype).tiny)
            r = call.rng.uniform((x0.shape[0],), x0)
            delta = z * (self.eps * r / norms).view(-1, *([1] * (x0.dim() - 1)))
        return (x0 + delta).clamp(0, 1)

    def _project(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """``x`` projected onto the ε-ball around ``x0`` (as :func:`fastdiv.eot_step`), clipped to [0, 1]."""
        delta = x - x0
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            norms = delta.flatten(1).norm(dim=1)
            scale = torch.where(norms > self.eps, self.eps / norms.clamp_min(torch.finfo(x.dtype).tiny),
                                torch.ones_like(norms))
            delta = delta * scale.view(-1, *([1] * (x.dim() - 1)))
        return (x0 + delta).clamp(0, 1)

    def _with_restarts(self, x0: torch.Tensor, y: torch.Tensor, call: _Call, restarts: int, run) -> torch.Tensor:
        """Run ``run(x0, y, call)`` ``restarts`` times and keep, per example, the worst case for the
        model: the result with the highest ensemble margin (mean softmax over ``num_samples`` sample
        models from one evaluation seed shared by all restarts; the fixed sample for eot='fixed').
        Later restarts only attack the examples not yet misclassified."""
        best = run(x0, y, call)
        if restarts == 1:
            return best
        best = best.clone()  # written in place below; never an alias of the input
        # drawn after the first run, so that it uses the same draws as restarts=1
        eval_seed = call.fixed_seed if self.eot == "fixed" else call.rng.seed()
        best_margin = self._margin(best, y, call, eval_seed)
        for _ in range(restarts - 1):
            idx = (best_margin <= 0).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            cand = run(x0[idx], y[idx], call)
            margin = self._margin(cand, y[idx], call, eval_seed)
            better = margin > best_margin[idx]
            best[idx[better]] = cand[better]
            best_margin[idx[better]] = margin[better]
        return best


def mean_sample_loss(loss, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example loss averaged over the sample models: ``logits [n, B, C]`` -> ``[B]``."""
    n, b = logits.shape[:2]
    return per_example_loss(loss, logits.reshape(n * b, -1), y.repeat(n)).view(n, b).mean(0)
