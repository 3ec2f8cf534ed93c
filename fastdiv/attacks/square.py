"""Square Attack, ℓ∞ (Andriushchenko et al. 2020, "Square Attack: a query-efficient black-box
adversarial attack via random search"), with the loss averaged over EOT sample models.

A score-based random search: start from vertical stripes of ±ε, then at every query change one
random square window (side s, one random sign ±ε per channel) of the current best perturbation and
keep the change when the loss decreases. The window's area is a fraction p of the image that
shrinks on the paper's schedule (p_init halved at 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000
of 10,000 queries, rescaled to ``n_queries``). No gradients.

On a randomized model under eot='mean' or 'one' every loss is a noisy estimate. Comparing a
candidate with the incumbent's loss stored when it was accepted would compare against the minimum
of many noisy estimates, biased low (a winner's curse), and the search would stall. So each query
evaluates the incumbent and the candidate on the same fresh sample models (common random numbers)
and keeps the candidate when it is better on those draws.
"""
from __future__ import annotations

import math

import torch

from .base import (
    Attack,
    _check_choice,
    _check_int,
    _check_number,
)
from .losses import _other_max, ensemble_margin

__all__ = ["Square", "p_selection"]

LOSSES = ("margin", "ce")
_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # of 10,000 queries; p halves after each


def p_selection(p_init: float, it: int, n_queries: int) -> float:
    """Fraction of the image the square covers at iteration ``it`` of ``n_queries`` (the paper's
    piecewise-constant schedule for 10,000 queries, rescaled)."""
    it = int(it / n_queries * 10000)
    halvings = sum(it > t for t in _SCHEDULE)
    return p_init / 2 ** halvings


class Square(Attack):
    """Score-based ℓ∞ Square Attack with EOT.

    Args:
        eps: ℓ∞ radius (default 8/255).
        n_queries: queries per example and restart, the initialization included (default 5000): one
            query per candidate evaluated, as the paper and AutoAttack count. A query evaluates
            ``num_samples`` sample models (``eot_samples`` for eot='mean'). On a randomized model with
            eot='mean' or 'one' each query after the first also re-evaluates the incumbent on the
            same sample models, so it costs 2 * ``num_samples`` forward rows per example (at most
            ``(2 * n_queries - 1) * num_samples`` per example and restart); on a deterministic model
            or with eot='fixed' the stored loss is exact and a query costs ``num_samples`` (one
            forward for a deterministic model).
        p_init: initial fraction of pixels changed per query (default 0.8, AutoAttack's; the paper
            uses 0.05 on ImageNet and 0.3/0.05 on MNIST/CIFAR).
        loss: 'margin' (default, ``z_y − max_{j≠y} z_j`` on the logits, minimized) or 'ce' (minimize
            −CE); either way averaged over the query's sample models.
        restarts: independent runs (>= 1) on the examples not yet misclassified; each example keeps
            the worst case (highest ensemble margin).
        eot, eot_samples, seed, strategy, model_mode: see :class:`~fastdiv.attacks.Attack`.

    An example stops being attacked once the ensemble prediction (mean softmax over the query's
    sample models) is wrong. Images must be ``[B, C, H, W]`` with H, W >= 2.
    """

    norms = ("linf",)
    min_input_dims = 4

    def __init__(self, model, eps: float = 8 / 255, n_queries: int = 5000, *, p_init: float = 0.8,
                 loss: str = "margin", restarts: int = 1, **kw) -> None:
        super().__init__(model, eps, **kw)
        self.n_queries = _check_int(n_queries, "n_queries", self.name)
        self.p_init = _check_number(p_init, "p_init", self.name, strict=True)
        if self.p_init > 1:
            raise ValueError(f"{self.name}: p_init must be in (0, 1], got {p_init!r}")
        self.loss = _check_choice(loss, "loss", self.name, LOSSES)
        self.restarts = _check_int(restarts, "restarts", self.name)

    def _query(self, x, y, call, seed):
        """(loss to minimize [B], ensemble margin [B] (> 0: fooled)) on the sample models of ``seed``."""
        return self._score(self._sample_logits(x, call, seed), y)

    def _score(self, logits, y):
        """(loss to minimize [B], ensemble margin [B]) of sample logits ``[n, B, C]``."""
        self._check_labels(y, logits.shape[-1])
        n, b, c = logits.shape
        flat, ys = logits.reshape(n * b, c).to(torch.promote_types(logits.dtype, torch.float32)), y.repeat(n)
        if self.loss == "margin":
            per = flat.gather(1, ys[:, None]).squeeze(1) - _other_max(flat, ys)
        else:
            per = -torch.nn.functional.cross_entropy(flat, ys, reduction="none")
        return per.view(n, b).mean(0), ensemble_margin(logits, y)

    def _judge(self, x_best, x_new, y, best_loss, call):
        """``(incumbent loss, incumbent margin or None, candidate loss, candidate margin)`` [k] of one
        query; the candidate replaces the incumbent where its loss is lower.

        ``best_loss`` is the incumbent's stored loss, or None when it must be re-measured: then both
        are evaluated on the sample models of one seed, in two forwards of equal batch size, so that
        per-element noise (drawn per sample model and batch position) is shared too, not only
        per-model draws as one forward over the stacked batch would share; each sample model's weights
        are drawn once for both."""
        seed = self._step_seed(call)
        if best_loss is None:
            best_logits, new_logits = self._sample_logits_of((x_best, x_new), call, seed)
            best_loss, best_margin = self._score(best_logits, y)
        else:
            best_margin, new_logits = None, self._sample_logits(x_new, call, seed)
        new_loss, new_margin = self._score(new_logits, y)
        return best_loss, best_margin, new_loss, new_margin

    def _once(self, x0, y, call):
        b, c, h, w = x0.shape
        if h < 2 or w < 2:
            raise ValueError(f"{self.name}: images must be at least 2x2 pixels, got shape {tuple(x0.shape)}")
        eps, rng = self.eps, call.rng
        stripes = torch.where(rng.uniform((b, c, 1, w), x0) < 0.5, -eps, eps).to(x0.dtype)
        x_best = (x0 + stripes).clamp(0, 1)
        loss, margin = self._query(x_best, y, call, self._step_seed(call))
        # fresh sample models at every query: the stored loss is a noisy estimate, re-measure it
        remeasure = self.eot != "fixed" and bool(call.randomness)
        rows = torch.arange(h, device=x0.device).view(1, 1, h, 1)
        cols = torch.arange(w, device=x0.device).view(1, 1, 1, w)
        for it in range(self.n_queries - 1):
            idx = (margin <= 0).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            xa, xb = x0[idx], x_best[idx]
            p = p_selection(self.p_init, it, self.n_queries)
            s = min(max(round(math.sqrt(p * h * w)), 1), min(h, w) - 1)
            top = rng.randint(h - s, (idx.numel(),), x0.device).view(-1, 1, 1, 1)
            left = rng.randint(w - s, (idx.numel(),), x0.device).view(-1, 1, 1, 1)
            window = (rows >= top) & (rows < top + s) & (cols >= left) & (cols < left + s)
            # the paper redraws the signs until the window changes; a window that no sign can
            # change (clipped at the box on both sides) is given up after a few draws
            x_new = xb
            todo = torch.arange(idx.numel(), device=x0.device)
            for _ in range(10):
                signs = torch.where(rng.uniform((todo.numel(), c, 1, 1), x0) < 0.5, -eps, eps).to(x0.dtype)
                cand = torch.where(window[todo], (xa[todo] + signs).clamp(0, 1), xb[todo])
                x_new = x_new.index_copy(0, todo, cand) if todo.numel() < idx.numel() else cand
                todo = todo[((cand - xb[todo]).abs() < 1e-7).flatten(1).all(1)]
                if todo.numel() == 0:
                    break
            best_loss, best_margin, new_loss, new_margin = self._judge(
                xb, x_new, y[idx], None if remeasure else loss[idx], call.subset(idx))
            better = new_loss < best_loss
            if best_margin is not None:
                # the stored values follow the incumbent's latest estimate (the stopping rule reads it)
                loss[idx], margin[idx] = best_loss, best_margin
            loss[idx[better]] = new_loss[better]
            margin[idx[better]] = new_margin[better]
            x_best[idx[better]] = x_new[better]
        return x_best

    def _attack(self, x0, y, call):
        return self._with_restarts(x0, y, call, self.restarts, self._once)
