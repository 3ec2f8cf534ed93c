"""Auto-PGD (Croce & Hein, ICML 2020, "Reliable evaluation of adversarial robustness with an ensemble
of diverse parameter-free attacks", arXiv:2003.01690, Algorithm 1), with EOT, and its targeted
version APGD-T.

APGD is PGD with momentum and a step size that adapts itself: it starts at η = 2ε and halves η at
checkpoints w_j where the loss stopped improving, restarting from the best point found so far:

* ``x^(1) = P_S(x^(0) + η ∇)``; then for k >= 1
  ``z = P_S(x^(k) + η ∇f(x^(k)))``, ``x^(k+1) = P_S(x^(k) + α(z − x^(k)) + (1 − α)(x^(k) − x^(k−1)))``
  with momentum α = 0.75 (∇ means sign(∇) for ℓ∞ and ∇/‖∇‖₂ for ℓ2);
* after step w_j, η is halved and x^(w_j) replaced by the best point x_max when
  (1) the loss increased in at most ρ·(w_j − w_{j−1}) of the steps since w_{j−1} (ρ = 0.75), or
  (2) η was not reduced at w_{j−1} and the best loss did not improve since (not at w_1).

Where AutoAttack's code and the paper differ, this follows the code (the reference every published
APGD number comes from):

* the checkpoints (:func:`apgd_checkpoints`) are AutoAttack's integer ones, ``w_1 = h_1``,
  ``w_{j+1} = w_j + h_{j+1}`` with ``h_1 = max(⌊0.22 N⌋, 1)`` and
  ``h_{j+1} = max(h_j − max(⌊0.03 N⌋, 1), max(⌊0.06 N⌋, 1))``, not the paper's ``⌈p_j N⌉``
  (the two agree at N = 100; at N = 20 the paper gives 5, 9, 12, 14, 16, 18, 19, 20, AutoAttack
  4, 7, 9, 10, 11, ..., 20);
* condition (1) counts "at most" (``<=``) where the paper writes "fewer than" (``<``);
* the check comes after step w_j and resets x^(w_j) (the paper resets x^(w_j + 1));
* condition (2) is off at the first checkpoint (AutoAttack starts with "reduced").

Two details of AutoAttack's bookkeeping are not copied: its first window compares the loss of
x^(1) with an unwritten (zero) entry instead of f(x^(0)), and after a reset it compares the next
loss with the loss before the reset; here each step is compared with the point it was taken from.

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
)
from .losses import dlr_loss, ensemble_margin, mean_sample_loss

__all__ = ["APGD", "APGDDLR", "APGDT", "apgd_checkpoints"]

LOSSES = ("ce", "dlr")


def apgd_checkpoints(steps: int) -> list[int]:
    """The checkpoints ``[0, w_1, w_2, ...]`` (all ``<= steps``) after which APGD may halve its step
    size, as AutoAttack's code computes them: the first check after ``h = max(⌊0.22 N⌋, 1)``
    steps, each next one ``h ← max(h − max(⌊0.03 N⌋, 1), max(⌊0.06 N⌋, 1))`` steps later.

    Integer arithmetic on ``int(0.22 * N)`` etc., as AutoAttack (``int`` of the float product).
    """
    _check_int(steps, "steps", "apgd_checkpoints")
    first, least, shrink = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    w, h = [0], first
    while w[-1] + h <= steps:
        w.append(w[-1] + h)
        h = max(h - shrink, least)
    return w


class APGD(Attack):
    """Auto-PGD with EOT (see the module docstring for the algorithm and where it follows AutoAttack's
    code rather than the paper).

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

    Targeted: ``atk(images, labels, target=t)`` ascends ``−CE(z, t)`` (loss 'ce'), the targeted DLR
    loss (loss 'dlr', needs >= 4 classes) or ``−loss(z, t)`` (a callable), and "misclassified"
    above becomes "classified as t". :class:`APGDT` is AutoAttack's APGD-T (its own targets).
    """

    supports_target = True

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
        """(grads [n, B, ...], mean loss [B], attack succeeded on the ensemble prediction [B]) at ``x``."""
        grads, logits = self._grads(x, y, call, self._loss_fn)
        labels, loss = self._objective(self._loss_fn, y, call)
        return grads, mean_sample_loss(loss, logits, labels), self._success_margin(logits, y, call) > 0

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
        # AutoAttack starts as if η had just been reduced: condition (2) is off at the first checkpoint
        f_max_ckpt, reduced_ckpt = f_max.clone(), torch.ones(batch, dtype=torch.bool, device=x0.device)
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
            done = k + 1  # steps taken; x = x^(done)
            if done < self.steps and done in checkpoints[1:]:
                lo = checkpoints[checkpoints.index(done) - 1]
                increases = sum((f_hist[i + 1] > f_hist[i]).to(torch.int64) for i in range(lo, done))
                cond1 = increases <= self.rho * (done - lo)  # AutoAttack's "<=" (the paper: "<")
                cond2 = ~reduced_ckpt & (f_max <= f_max_ckpt)
                reset = cond1 | cond2
                eta = torch.where(reset, eta / 2, eta)
                if bool(reset.any()):
                    mask = reset.view(expand)
                    x = torch.where(mask, x_max, x)
                    grads = torch.where(mask.unsqueeze(0), g_max, grads)
                    f_hist[-1] = torch.where(reset, f_max, f)  # the next step is compared with x_max
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


class APGDT(APGD):
    """APGD-T: :class:`APGD` on the targeted DLR loss ``−(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2 + 1e−12)``
    (Croce & Hein, ICML 2020, arXiv:2003.01690, §4; :class:`~fastdiv.attacks.losses.dlr_targeted_loss`),
    run for the top runner-up classes in turn, as AutoAttack's APGD-T.

    For target rank r = 1, ..., ``n_target_classes`` (r = 1: the class with the second highest
    clean score), ``restarts`` APGD runs target, for each example still robust, its r-th ranked
    class; an example is done once it is misclassified (an untargeted success: the targets only
    guide the loss). Ranks come from the clean ensemble prediction (mean softmax over the
    evaluation sample models; the fixed sample for eot='fixed'). Each example keeps the worst case
    for the model over all runs (highest ensemble margin ``max_{j≠y} p̄_j − p̄_y``).

    Args:
        eps: radius (default 8/255). norm: 'linf' (default) or 'l2'. steps: iterations per run
            (default 100). n_target_classes: how many runner-up classes to target (default 9,
            AutoAttack's; at most C − 1 are used). restarts: runs per target (default 1, AutoAttack's
            'standard' version). random_start, rho, momentum and the common arguments: see :class:`APGD`.

    Needs a model with at least 4 classes (the DLR-T denominator uses z_π4). No ``target=`` at the
    call: for given targets use ``APGD(loss='dlr')(images, labels, target=t)``.
    """

    supports_target = False

    def __init__(self, model, eps: float = 8 / 255, steps: int = 100, *, n_target_classes: int = 9, **kw) -> None:
        if "loss" in kw:
            raise TypeError("APGDT: the loss is the targeted DLR loss; use APGD(loss=..., target=...) for another")
        super().__init__(model, eps, steps, loss="dlr", **kw)
        self.n_target_classes = _check_int(n_target_classes, "n_target_classes", self.name)

    def _attack(self, x0, y, call):
        eval_seed = call.fixed_seed if self.eot == "fixed" else call.rng.seed()
        logits = self._sample_logits(x0, call, eval_seed)
        classes = logits.shape[-1]
        if classes < 4:
            raise ValueError(f"{self.name}: the targeted DLR loss needs at least 4 classes, the model has {classes}")
        self._check_labels(y, classes)
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1).mean(0)
        # ranked classes with the true class moved last: for a correctly classified example this is
        # AutoAttack's ranking of the clean output (the true class is first there)
        ranked = probs.scatter(1, y[:, None], -math.inf).argsort(1, descending=True)
        best, best_margin = x0.clone(), ensemble_margin(logits, y)
        for r in range(min(self.n_target_classes, classes - 1)):
            for _ in range(self.restarts):
                idx = (best_margin <= 0).nonzero().squeeze(1)
                if idx.numel() == 0:
                    return best
                sub = call.subset(idx).with_target(ranked[idx, r], success_target=False)
                cand = self._once(x0[idx], y[idx], sub)
                margin = self._margin(cand, y[idx], sub, eval_seed)
                better = margin > best_margin[idx]
                best[idx[better]] = cand[better]
                best_margin[idx[better]] = margin[better]
        return best
