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

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..grads import STRATEGIES, resolve_seed, sample_input_grads, sample_logits_of
from ..nn.randomness import MODEL_MODES, Randomness, detect_randomness, model_mode
from .losses import ensemble_margin, targeted_loss

__all__ = ["EOT_MODES", "MODEL_MODES", "NORMS", "Attack"]

EOT_MODES = ("mean", "one", "fixed")
NORMS = ("linf", "l2")

#: how far outside [0, 1] an input may lie (float rounding of a normalization) before it is rejected
RANGE_TOLERANCE = 1e-6


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
    """Per-call state handed to :meth:`Attack._attack`: the RNG, the seed of the fixed sample, the
    model's randomness (resolved once per call) and the targets.

    ``target`` (``[B]`` or None): the class the loss is descended toward. ``success_target``: success
    means "classified as ``target``" (a targeted call) rather than "misclassified" (APGD-T uses
    targets only to guide its loss). ``rows`` (``[B]`` or None for all): the positions of the batch's
    examples in the caller's batch, so that an error names the caller's example.
    """

    def __init__(self, rng: _Rng, fixed_seed: int, randomness: Randomness, target: torch.Tensor | None = None,
                 success_target: bool = True, rows: torch.Tensor | None = None) -> None:
        self.rng = rng
        self.fixed_seed = fixed_seed
        self.randomness = randomness
        self.target = target
        self.success_target = success_target
        self.rows = rows

    def subset(self, idx: torch.Tensor) -> _Call:
        """The same call restricted to the examples ``idx`` (same RNG: draws continue)."""
        return _Call(self.rng, self.fixed_seed, self.randomness, None if self.target is None else self.target[idx],
                     self.success_target, idx if self.rows is None else self.rows[idx])

    def with_target(self, target: torch.Tensor | None, success_target: bool) -> _Call:
        return _Call(self.rng, self.fixed_seed, self.randomness, target, success_target, self.rows)


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


@contextlib.contextmanager
def _input_gradients_only(model: nn.Module) -> Iterator[None]:
    """The model's parameters stop requiring gradients inside the block (restored after, each as it was):
    an attack differentiates with respect to its input only, so the forwards need not record the
    parameters' part of the graph (a Bayesian layer's weight sampling, for one)."""
    previous = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in previous:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in previous:
            p.requires_grad_(flag)


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

    Call: ``atk(images, labels, target=None)``. ``images`` ``[B, *input_shape]`` floating point in
    [0, 1] (NCHW for images), ``labels`` ``[B]`` integers in ``[0, C)``: the true classes. Returns the
    adversarial batch (same shape and dtype, on ``images``' device; computed on the model's device).
    Inputs are never modified; an empty batch returns an empty result.

    Targeted mode (the gradient attacks and :class:`~fastdiv.attacks.APGD`; ``supports_target``):
    ``target`` ``[B]`` integers in ``[0, C)``, each different from its label, makes the attack descend
    the loss toward the target class (``−loss(logits, target)``; the CW hinge and DLR get their
    targeted forms, see :func:`targeted_loss`), and success (restarts, APGD's choice of iterate)
    means "the ensemble prediction is the target". This is torchattacks'
    ``set_mode_targeted_by_label`` with the targets given beside the true labels rather than in
    their place, so that a target equal to the true label is caught.
    """

    #: whether the call accepts ``target=`` (targeted mode)
    supports_target: bool = False

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

    def _check_target(self, target, labels: torch.Tensor) -> None:
        fn = self.name
        if not self.supports_target:
            raise TypeError(f"{fn}: no targeted mode (target= is for the gradient attacks and APGD)")
        if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.is_complex() \
                or target.dtype == torch.bool:
            raise TypeError(f"{fn}: target must be an integer tensor [B] of target classes, got "
                            f"{target.dtype if isinstance(target, torch.Tensor) else type(target).__name__}")
        if target.shape != labels.shape:
            raise ValueError(f"{fn}: target must have shape {tuple(labels.shape)} (one target class per image), "
                             f"got {tuple(target.shape)}")
        if target.numel() and int(target.min()) < 0:
            raise ValueError(f"{fn}: target must be class indices >= 0, got min {int(target.min())}")
        same = (target.to(labels.device) == labels).nonzero().flatten()
        if same.numel():
            raise ValueError(f"{fn}: target must differ from the true label of every example; it equals the label "
                             f"at {same.numel()} example(s), first index {int(same[0])}")

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, target: torch.Tensor | None = None
                 ) -> torch.Tensor:
        self._check_call(images, labels)
        if target is not None:
            self._check_target(target, labels)
        if images.shape[0] == 0:
            return images.detach().clone()
        device = _model_device(self.model, images.device)
        x0 = images.detach().to(device)
        y = labels.detach().to(device=device, dtype=torch.long)
        with model_mode(self.model, self.model_mode), _input_gradients_only(self.model):
            randomness = detect_randomness(self.model, x0, stochastic=self.stochastic)
            rng = _Rng(self.seed)
            # drawn first in every mode, so that the random starts of all modes agree
            call = _Call(rng, rng.seed(), randomness)
            if target is not None:
                t = target.detach().to(device=device, dtype=torch.long)
                with torch.no_grad():  # the class count, for a clear error before any step
                    classes = self._sample_logits(x0[:1], call, call.fixed_seed, 1).shape[-1]
                if int(t.max()) >= classes:
                    raise ValueError(f"{self.name}: target must be in [0, {classes}) for a model with {classes} "
                                     f"classes, got max {int(t.max())}")
                call = call.with_target(t, success_target=True)
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

    @staticmethod
    def _objective(loss, y: torch.Tensor, call: _Call):
        """``(labels, loss)`` the step ascends: ``(y, loss)``, or with a target ``(target,
        targeted_loss(loss, y))``, which descends toward the target class."""
        if call.target is None:
            return y, loss
        return call.target, targeted_loss(loss, y)

    def _grads(self, x: torch.Tensor, y: torch.Tensor, call: _Call, loss, num_samples: int | None = None):
        """``(grads [n, B, ...], logits [n, B, C])`` of the next step's sample models, for the loss of
        :meth:`_objective` (targeted when the call has a target)."""
        n = self.num_samples if num_samples is None else num_samples
        labels, loss = self._objective(loss, y, call)
        grads, logits = self._wrap_errors(sample_input_grads, self.model, x, labels, n, loss=loss,
                                          strategy=self.strategy, generator=self._step_seed(call),
                                          stochastic=call.randomness)
        self._check_finite(logits, call)
        return grads, logits

    def _check_finite(self, logits: torch.Tensor, call: _Call) -> None:
        """Raises where the model returned NaN or Inf logits ``[n, B, C]`` for the batch of ``call``: every
        model output reaches the attack through :meth:`_grads` or :meth:`_sample_logits_of`, so the first
        forward that sees them stops the call, before a NaN step could leave the [0, 1] box or be
        returned as an adversarial example. One ``isfinite().all()`` per forward."""
        if bool(torch.isfinite(logits).all()):
            return
        bad = (~torch.isfinite(logits)).flatten(2).any(-1).any(0).nonzero().flatten()
        mapped = call.rows is not None and call.rows.numel() == logits.shape[1]
        rows = (call.rows[bad] if mapped else bad).unique()
        raise ValueError(f"{self.name}: the model returned non-finite logits (NaN or Inf) for {rows.numel()} "
                         f"example(s) of the batch, first index {int(rows.min())}; the attack cannot follow "
                         f"them (check the model, e.g. its normalization, for these inputs)")

    @staticmethod
    def _success_margin(logits: torch.Tensor, y: torch.Tensor, call: _Call) -> torch.Tensor:
        """> 0 exactly where the attack succeeded on the ensemble prediction (mean softmax of
        ``logits [n, B, C]``): misclassified, or for a targeted call classified as the target
        (``p̄_t − max_{j≠t} p̄_j``)."""
        if call.target is not None and call.success_target:
            return -ensemble_margin(logits, call.target)
        return ensemble_margin(logits, y)

    def _sample_logits(self, x: torch.Tensor, call: _Call, seed: int, num_samples: int | None = None
                       ) -> torch.Tensor:
        """Logits ``[n, B, C]`` of n sample models drawn from ``seed`` (no gradient): one forward over
        the replicated batch or n forwards, chosen by ``strategy`` as sample_input_grads does."""
        return self._sample_logits_of((x,), call, seed, num_samples)[0]

    def _sample_logits_of(self, inputs, call: _Call, seed: int, num_samples: int | None = None
                          ) -> list[torch.Tensor]:
        """:meth:`_sample_logits` of each of ``inputs`` on the same sample models (weights drawn once)."""
        n = self.num_samples if num_samples is None else num_samples
        out = sample_logits_of(self.model, inputs, n, seed=seed, strategy=self.strategy,
                               stochastic=call.randomness, fn=self.name)
        for logits in out:
            self._check_finite(logits, call)
        return out

    def _check_labels(self, y: torch.Tensor, classes: int) -> None:
        if y.numel() and int(y.max()) >= classes:
            raise ValueError(f"{self.name}: labels must be in [0, {classes}) for a model with {classes} classes, "
                             f"got max {int(y.max())}")

    def _margin(self, x: torch.Tensor, y: torch.Tensor, call: _Call, seed: int) -> torch.Tensor:
        """Ensemble margin ``max_{j≠y} p̄_j − p̄_y`` (targeted: ``p̄_t − max_{j≠t} p̄_j``) over
        ``num_samples`` sample models from ``seed`` (> 0: the attack succeeded on that example)."""
        logits = self._sample_logits(x, call, seed)
        self._check_labels(y, logits.shape[-1])
        return self._success_margin(logits, y, call)

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
        models from one evaluation seed shared by all restarts; the fixed sample for eot='fixed';
        for a targeted call the margin of the target class). Later restarts only attack the examples
        where the attack has not yet succeeded."""
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
            sub = call.subset(idx)
            cand = run(x0[idx], y[idx], sub)
            margin = self._margin(cand, y[idx], sub, eval_seed)
            better = margin > best_margin[idx]
            best[idx[better]] = cand[better]
            best_margin[idx[better]] = margin[better]
        return best

