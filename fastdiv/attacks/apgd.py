"""Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", Algorithm 1), with EOT.

APGD is PGD with momentum and a step size that adapts itself: it starts at η = 2ε and halves η at
checkpoints w_j where the loss stopped improving, restarting from the best point found so far.
Written from the paper's algorithm:

* checkpoints ``w_j = ⌈p_j N⌉`` with ``p_0 = 0``, ``p_1 = 0.22``,
  ``p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)``;
* ``x^(1) = P_S(x^(0) + η ∇)``; then for k >= 1
  ``z = P_S(x^(k) + η ∇f(x^(k)))``, ``x^(k+1) = P_S(x^(k) + α(z − x^(k)) + (1 − α)(x^(k) − x^(k−1)))``
  with momentum α = 0.75 (∇ means sign(∇) for ℓ∞ and ∇/‖∇‖₂ for ℓ2);
* at a checkpoint w_j, η is halved and x^(k+1) reset to the best point x_max when
  (1) the loss increased in fewer than ρ·(w_j − w_{j−1}) of the steps since w_{j−1} (ρ = 0.75), or
  (2) η was not reduced at w_{j−1} and the best loss did not improve since.

With EOT, f and ∇f at each iterate are the mean loss and the mean gradient of the step's sample
models (AutoAttack's ``eot_iter``); the gradient step itself is one :func:`fastdiv.eot_step` on the
n sample gradients. All state (η, best point, counters) is per example.
"""
from __future__ import annotations

import math

import torch

from ..eot import eot_step
from .base import (
    Attack,
    _check_choice,
    _check_int,
    _check_number,
    dlr_loss,
    ensemble_margin,
    mean_sample_loss,
)

__all__ = ["APGD", "APGDDLR", "apgd_checkpoints"]

LOSSES = ("ce", "dlr")


def apgd_checkpoints(steps: int) -> list[int]:
    """The checkpoints ``w_0 = 0 < w_1 < ... <= steps`` of APGD (Croce & Hein 2020, §3.2)."""
    p = [0.0, 0.22]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)
        if math.ceil(nxt * steps) > steps:
            break
        p.append(nxt)
    w = []
    for pj in p:
        wj = math.ceil(round(pj * steps, 9))  # round: 0.22 * 50 must give 11, not 12
        if wj <= steps and (not w or wj > w[-1]):
            w.append(wj)
    return w


class APGD(Attack):
    """Auto-PGD with EOT (see the module docstring for the algorithm).

    Args:
        eps: radius (default 8/255). norm: 'linf' (default) or 'l2'.
        steps: iterations N (default 100, AutoAttack's; N + 1 gradient evaluations).
        loss: 'ce' (APGD-CE) or 'dlr' (APGD-DLR, :func:`dlr_loss`, needs >= 3 classes), or a callable
            ``(logits [N, C], y [N]) -> [N]`` to ascend.
        restarts: independent runs from random starts (>= 1); each example keeps the worst case for
            the model (highest ensemble margin), and later runs only attack examples not yet
            misclassified.
        random_start: start from a random point of the ε-ball (default) or from the clean input.
        rho: checkpoint condition (1) threshold (default 0.75). momentum: α of the update (0.75).
        eot, eot_samples, seed, strategy, model_mode: see :class:`~fastdiv.attacks.Attack`.

    Returns per example the misclassified iterate with the highest loss if one occurred
    (misclassified = wrong ensemble prediction of the mean softmax over the step's sample models),
    else the iterate with the highest loss.
    """

    def __init__(self, model, eps: float = 8 / 255, steps: int = 100, *, norm: str = "linf", loss="ce",
                 restarts: int = 1, random_start: bool = True, rho: float = 0.75, momentum: float = 0.75,
                 **kw) -> None:
        super().__init__(model, eps, norm=norm, **kw)
        self.steps = _check_int(steps, "steps", self.name)
        self.loss = loss if callable(loss) else _check_choice(loss, "loss", self.name, LOSSES)
        self.restarts = _check_int(restarts, "restarts", self.name)
        if not isinstance(random_start, bool):
            raise TypeError(f"{self.name}: random_start must be a bool, got {type(random_start).__name__}")
        self.random_start = random_start
        self.rho = _check_number(rho, "rho", self.name)
        self.momentum = _check_number(momentum, "momentum", self.name)
        if self.momentum > 1:
            raise ValueError(f"{self.name}: momentum must be in [0, 1], got {momentum!r}")

    @property
    def _loss_fn(self):
        return dlr_loss if self.loss == "dlr" else self.loss

    def _evaluate(self, x, y, call):
        """(grads [n, B, ...], mean loss [B], ensemble prediction wrong [B]) at ``x``."""
        grads, logits = self._grads(x, y, call, self._loss_fn)
        return grads, mean_sample_loss(self._loss_fn, logits, y), ensemble_margin(logits, y) > 0

    def _once(self, x0, y, call):
        batch, eps = x0.shape[0], self.eps
        expand = (-1,) + (1,) * (x0.dim() - 1)
        checkpoints = apgd_checkpoints(self.steps)
        x = self._random_start(x0, call) if self.random_start else x0
        grads, f, wrong = self._evaluate(x, y, call)
        # best loss point (x_max) and its gradients; best misclassified point
        x_max, f_max, g_max = x.clone(), f.clone(), grads.clone()
        x_adv, f_adv = x.clone(), torch.where(wrong, f, torch.full_like(f, -math.inf))
        eta = torch.full((batch,), 2 * eps, dtype=torch.promote_types(x0.dtype, torch.float32), device=x0.device)
        f_hist = [f]
        f_max_ckpt, reduced_ckpt = f_max.clone(), torch.zeros(batch, dtype=torch.bool, device=x0.device)
        x_prev = x
        for k in range(self.steps):
            z = eot_step(x, x0, grads, alpha=eta, eps=eps, norm=self.norm)
            if k == 0:
                x_new = z
            else:
                a = self.momentum
                x_new = self._project(x + a * (z - x) + (1 - a) * (x - x_prev), x0)
            x_prev, x = x, x_new
            grads, f, wrong = self._evaluate(x, y, call)
            better = f > f_max
            x_max[better], f_max[better], g_max[:, better] = x[better], f[better], grads[:, better]
            adv = wrong & (f > f_adv)
            x_adv[adv], f_adv[adv] = x[adv], f[adv]
            f_hist.append(f)
            if k + 1 < self.steps and k in checkpoints[1:]:
                j = checkpoints.index(k)
                lo = checkpoints[j - 1]
                increases = sum((f_hist[i + 1] > f_hist[i]).to(torch.int64) for i in range(lo, k))
                cond1 = increases < self.rho * (k - lo)
                cond2 = ~reduced_ckpt & (f_max <= f_max_ckpt)
                reset = cond1 | cond2
                eta = torch.where(reset, eta / 2, eta)
                if bool(reset.any()):
                    mask = reset.view(expand)
                    x = torch.where(mask, x_max, x)
                    grads = torch.where(mask.unsqueeze(0), g_max, grads)
                    f_hist[-1] = torch.where(reset, f_max, f)
                reduced_ckpt, f_max_ckpt = reset, f_max.clone()
        found = torch.isfinite(f_adv).view(expand)
        return torch.where(found, x_adv, x_max)

    def _attack(self, x0, y, call):
        return self._with_restarts(x0, y, call, self.restarts, self._once)


class APGDDLR(APGD):
    """:class:`APGD` with the DLR loss (``loss='dlr'``): APGD-DLR."""

    def __init__(self, model, eps: float = 8 / 255, steps: int = 100, **kw) -> None:
        kw.setdefault("loss", "dlr")
        super().__init__(model, eps, steps, **kw)
