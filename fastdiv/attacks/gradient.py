"""Gradient attacks: FGSM, FGM, R-FGSM, BIM (I-FGSM), PGD (ℓ∞, ℓ2), MI-FGSM and PGD-CW.

Each step gets the n sample models' input gradients from :func:`fastdiv.sample_input_grads` (one
batched pass where the model supports it) and updates the batch with the fused
:func:`fastdiv.eot_step` (mean gradient, sign or ℓ2 direction, projection, clip; MI-FGSM momentum).

Every attack here has a targeted mode: ``atk(images, labels, target=t)`` descends the loss toward
the target classes ``t`` (``−loss(logits, t)``; PGD-CW's hinge becomes ``min(z_t − max_{j≠t} z_j, κ)``),
with the same EOT over sample models, and restarts count an example as done once the ensemble
prediction is its target (see :class:`~fastdiv.attacks.Attack`).
"""
from __future__ import annotations

import torch

from ..eot import eot_step
from .base import (
    Attack,
    _Call,
    _check_choice,
    _check_int,
    _check_loss,
    _check_number,
)
from .losses import cw_loss

__all__ = ["BIM", "FGM", "FGSM", "MIFGSM", "PGD", "PGDCW", "PGDL2", "RFGSM"]


class _Iterative(Attack):
    """Shared loop of the iterative attacks: ``steps`` EOT steps of size ``alpha`` from ``start``
    (toward ``call.target`` in targeted mode: :meth:`Attack._grads` picks the loss)."""

    supports_target = True

    def _iterate(self, x: torch.Tensor, x0: torch.Tensor, y: torch.Tensor, call: _Call, *, alpha: float,
                 steps: int, loss, decay: float | None = None) -> torch.Tensor:
        momentum = None if decay is None else torch.zeros_like(x0, dtype=torch.promote_types(x0.dtype, torch.float32))
        for _ in range(steps):
            grads, _ = self._grads(x, y, call, loss)
            if momentum is None:
                x = eot_step(x, x0, grads, alpha=alpha, eps=self.eps, norm=self.norm)
            else:
                x, momentum = eot_step(x, x0, grads, alpha=alpha, eps=self.eps, norm=self.norm,
                                       momentum=momentum, decay=decay)
        return x


class FGSM(_Iterative):
    """Fast Gradient Sign Method (Goodfellow et al. 2015): ``x + ε·sign(∇)``, clipped to [0, 1].

    Args: ``model``, ``eps`` (default 8/255), ``loss`` ('ce' default, 'logit', 'cw' or a callable
    ``(logits [N, C], y [N]) -> [N]`` to ascend), and the common ``eot``, ``eot_samples``, ``seed``,
    ``strategy``, ``model_mode`` (:class:`~fastdiv.attacks.Attack`). With EOT the step follows the
    sign of the mean gradient over the sample models.
    """

    norms = ("linf",)

    def __init__(self, model, eps: float = 8 / 255, *, loss="ce", **kw) -> None:
        super().__init__(model, eps, norm=kw.pop("norm", "linf"), **kw)
        self.loss = _check_loss(loss, self.name)

    def _attack(self, x0, y, call):
        return self._iterate(x0, x0, y, call, alpha=self.eps, steps=1, loss=self.loss)


class FGM(FGSM):
    """Fast Gradient Method in ℓ2: ``x + ε·∇/‖∇‖₂``, clipped to [0, 1] (eps default 1.0)."""

    norms = ("l2",)

    def __init__(self, model, eps: float = 1.0, *, loss="ce", **kw) -> None:
        super().__init__(model, eps, loss=loss, norm=kw.pop("norm", "l2"), **kw)


class RFGSM(_Iterative):
    """R-FGSM (Tramèr et al. 2018, "Ensemble Adversarial Training"): a random step of size α, then a
    gradient-sign step of size ε − α from there: ``x' = clip(x + δ)``,
    ``x_adv = clip(Π_ε(x' + (ε − α)·sign(∇_x' L(x', y))))``.

    Args:
        eps: ℓ∞ radius (default 8/255). alpha: size of the random step (default ε/2, Tramèr et al.);
            ``0 <= alpha <= eps``.
        random: 'uniform' (δ ~ U(−α, α) per element, as the GAL paper describes it) or 'sign'
            (δ = α·sign(N(0, I)), Tramèr et al.'s original).
        loss, and the common arguments of :class:`~fastdiv.attacks.Attack`.
    """

    norms = ("linf",)

    def __init__(self, model, eps: float = 8 / 255, alpha: float | None = None, *, random: str = "uniform",
                 loss="ce", **kw) -> None:
        super().__init__(model, eps, **kw)
        self.alpha = self.eps / 2 if alpha is None else _check_number(alpha, "alpha", self.name)
        if self.alpha > self.eps:
            raise ValueError(f"{self.name}: alpha (the random step) must be <= eps, got alpha={self.alpha:g} > "
                             f"eps={self.eps:g}")
        self.random = _check_choice(random, "random", self.name, ("uniform", "sign"))
        self.loss = _check_loss(loss, self.name)

    def _attack(self, x0, y, call):
        u = call.rng.uniform(x0.shape, x0)
        if self.random == "uniform":
            delta = (2 * u - 1) * self.alpha
        else:  # sign(N(0, 1)) is a fair coin: the same draw, thresholded
            delta = torch.where(u < 0.5, -self.alpha, self.alpha).to(x0.dtype)
        x = (x0 + delta).clamp(0, 1)
        return self._iterate(x, x0, y, call, alpha=self.eps - self.alpha, steps=1, loss=self.loss)


class BIM(_Iterative):
    """Basic Iterative Method / I-FGSM (Kurakin et al. 2017): ``steps`` sign steps of size α from the
    clean input, each projected onto the ℓ∞ ε-ball and clipped to [0, 1].

    Args: ``eps`` (default 8/255), ``alpha`` (default ε/steps: k steps of ε/k, as in the GAL paper;
    torchattacks' default is 2/255), ``steps`` (default 10), ``loss`` and the common arguments.
    """

    norms = ("linf",)

    def __init__(self, model, eps: float = 8 / 255, alpha: float | None = None, steps: int = 10, *,
                 loss="ce", **kw) -> None:
        super().__init__(model, eps, **kw)
        self.steps = _check_int(steps, "steps", self.name)
        self.alpha = self.eps / self.steps if alpha is None else _check_number(alpha, "alpha", self.name)
        self.loss = _check_loss(loss, self.name)

    def _attack(self, x0, y, call):
        return self._iterate(x0, x0, y, call, alpha=self.alpha, steps=self.steps, loss=self.loss)


class PGD(_Iterative):
    """Projected Gradient Descent (Madry et al. 2018), ℓ∞ or ℓ2, from a random start.

    Args:
        eps: radius (default 8/255). alpha: step size (default ε/4, GradDiv's choice; = torchattacks'
            2/255 at ε = 8/255). steps: iterations (default 10).
        random_start: start from a uniformly random point of the ball (ℓ∞: U(−ε, ε) per element; ℓ2:
            uniform direction, radius ε·U(0, 1)) instead of the clean input.
        norm: 'linf' (sign steps, element clamp) or 'l2' (normalized gradient steps, ball projection).
        restarts: independent runs (>= 1); each example keeps the run that is worst for the model
            (highest ensemble margin, see :meth:`~fastdiv.attacks.Attack._with_restarts`).
        loss: 'ce' (default), 'logit', 'cw' or a callable ``(logits [N, C], y [N]) -> [N]`` to ascend.
        eot, eot_samples, seed, strategy, model_mode: see :class:`~fastdiv.attacks.Attack`.
            EOT-PGD is ``eot='mean'``: each step follows the mean gradient of ``eot_samples`` fresh
            sample models.
    """

    def __init__(self, model, eps: float = 8 / 255, alpha: float | None = None, steps: int = 10,
                 random_start: bool = True, *, norm: str = "linf", restarts: int = 1, loss="ce", **kw) -> None:
        super().__init__(model, eps, norm=norm, **kw)
        self.steps = _check_int(steps, "steps", self.name)
        self.alpha = self.eps / 4 if alpha is None else _check_number(alpha, "alpha", self.name)
        if not isinstance(random_start, bool):
            raise TypeError(f"{self.name}: random_start must be a bool, got {type(random_start).__name__}")
        self.random_start = random_start
        self.restarts = _check_int(restarts, "restarts", self.name)
        self.loss = _check_loss(loss, self.name)

    def _once(self, x0, y, call):
        x = self._random_start(x0, call) if self.random_start else x0
        return self._iterate(x, x0, y, call, alpha=self.alpha, steps=self.steps, loss=self.loss)

    def _attack(self, x0, y, call):
        return self._with_restarts(x0, y, call, self.restarts, self._once)


class PGDL2(PGD):
    """:class:`PGD` in ℓ2 (``norm='l2'``; eps default 1.0, alpha default ε/4)."""

    def __init__(self, model, eps: float = 1.0, alpha: float | None = None, steps: int = 10,
                 random_start: bool = True, **kw) -> None:
        kw.setdefault("norm", "l2")
        super().__init__(model, eps, alpha, steps, random_start, **kw)


class MIFGSM(_Iterative):
    """Momentum Iterative FGSM (Dong et al. 2018): ``g ← μ·g + ∇/‖∇‖₁``, ``x ← Π(x + α·sign(g))``.

    Args: ``eps`` (default 8/255), ``alpha`` (default ε/steps), ``steps`` (default 10), ``decay`` μ
    (default 1.0), ``loss`` and the common arguments. With EOT the momentum accumulates the mean
    gradient of the step's sample models (normalized by its ℓ1 norm). Same steps as torchattacks'
    MIFGSM (which normalizes by the mean |∇| instead: a constant factor, the sign is the same).
    """

    def __init__(self, model, eps: float = 8 / 255, alpha: float | None = None, steps: int = 10,
                 decay: float = 1.0, *, loss="ce", **kw) -> None:
        super().__init__(model, eps, **kw)
        self.steps = _check_int(steps, "steps", self.name)
        self.alpha = self.eps / self.steps if alpha is None else _check_number(alpha, "alpha", self.name)
        self.decay = _check_number(decay, "decay", self.name)
        self.loss = _check_loss(loss, self.name)

    def _attack(self, x0, y, call):
        return self._iterate(x0, x0, y, call, alpha=self.alpha, steps=self.steps, loss=self.loss,
                             decay=self.decay)


class PGDCW(PGD):
    """PGD on the Carlini–Wagner hinge ``min(max_{j≠y} z_j − z_y, κ)`` (:func:`cw_loss`), as the
    GAL paper's PGD-CW (κ = 50, 30 iterations, the defaults here).

    Args: ``eps`` (default 8/255), ``alpha`` (default ε/4), ``steps`` (default 30), ``confidence`` κ
    (default 50), ``random_start``, ``norm``, ``restarts`` and the common arguments of :class:`PGD`.
    """

    def __init__(self, model, eps: float = 8 / 255, alpha: float | None = None, steps: int = 30,
                 random_start: bool = True, *, confidence: float = 50.0, **kw) -> None:
        if "loss" in kw:
            raise TypeError("PGDCW: the loss is the CW hinge; set confidence=, or use PGD(loss=...)")
        self.confidence = _check_number(confidence, "confidence", "PGDCW")
        super().__init__(model, eps, alpha, steps, random_start, loss=cw_loss(self.confidence), **kw)
