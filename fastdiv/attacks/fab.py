"""FAB-T: the targeted Fast Adaptive Boundary attack (Croce & Hein, "Minimally distorted adversarial
examples with a fast adaptive boundary attack", ICML 2020, arXiv:1907.02044), in the form AutoAttack
runs it, with EOT.

FAB looks for the adversarial example of smallest ℓp norm. For a target class t it repeats:

* linearize the decision boundary between the true class y and t at the iterate x:
  ``f(z) ≈ f(x) + <∇f(x), z − x>`` with ``f = z_t − z_y`` (with EOT: f and ∇f are the means over the
  step's sample models);
* project both the iterate x and the clean input x₀ onto the hyperplane ``f(x) + <∇f(x), z − x> = 0``
  intersected with the box [0, 1]^D (minimal ℓp distance, :func:`fab_projection`): steps δ₁ and δ₂;
* take the biased step ``x ← clip((1 − α)(x + η δ₁) + α(x₀ + η δ₂))`` with
  ``α = min(‖δ₁‖ / (‖δ₁‖ + ‖δ₂‖), α_max)``: the extrapolation η > 1 overshoots the boundary a little,
  the bias α pulls the iterate towards x₀ to keep the perturbation small;
* when the new iterate is misclassified, keep it if it is the closest to x₀ so far, then go back
  towards x₀: ``x ← x₀ + β(x − x₀)``.

FAB-T (AutoAttack) runs this for the runner-up classes in turn — the class ranked second by the
clean prediction, then third, ... (``n_target_classes`` of them; 9 in AutoAttack's standard version,
100 iterations, 1 restart) — each time only on the points still robust.

A success counts only within eps. By default (``final='eps'``) a success is then moved out along its
perturbation to the eps-sphere when that raises the ensemble margin: FAB's points sit on the
boundary, where the sample models of a randomized model disagree (see :class:`FAB`).
"""
from __future__ import annotations

import math

import torch

from .base import Attack, _check_choice, _check_int, _check_number
from .losses import ensemble_margin

__all__ = ["FAB", "fab_projection"]

FINALS = ("eps", "minimal")


def _norm(x: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-row ℓ∞ / ℓ2 norm of a batch ``[B, ...]``."""
    flat = x.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def fab_projection(points: torch.Tensor, w: torch.Tensor, b: torch.Tensor, norm: str = "linf") -> torch.Tensor:
    """Minimal ℓp step onto a hyperplane within the box: for each row, the ``d`` minimizing ``‖d‖_p``
    subject to ``<w, points + d> = b`` and ``points + d ∈ [0, 1]^D`` (p = ∞ or 2).

    Args:
        points: ``[B, D]`` points in [0, 1]. w: ``[B, D]`` normals. b: ``[B]`` offsets.
        norm: 'linf' or 'l2'.

    Returns ``d [B, D]``. Where no point of the box reaches the hyperplane, ``d`` moves every
    coordinate with ``w_i ≠ 0`` to the face of the box that gets closest to it (the limit of the
    solution as the radius grows; the box point of least violation).

    Both problems reduce to one scalar equation. Say ``r = b − <w, points> > 0`` (else flip w);
    coordinate i can move by at most ``room_i`` (to 1 if ``w_i > 0``, to 0 if ``w_i < 0``) and every
    optimal ``d`` moves it in the direction of ``w_i``, by ``min(λ, room_i)`` (ℓ∞, radius λ) or
    ``min(μ|w_i|, room_i)`` (ℓ2, KKT with multiplier μ). The progress ``G = Σ_i |w_i| · |d_i|`` is then
    ``Σ_i a_i min(λ, v_i)`` with ``(a_i, v_i) = (|w_i|, room_i)`` for ℓ∞ and ``(w_i², room_i / |w_i|)``
    for ℓ2: concave, piecewise linear and nondecreasing in λ, with breakpoints ``v_i``. Sorting the
    breakpoints and evaluating G at all of them with cumulative sums locates the piece where
    ``G(λ) = r``, where λ is solved in closed form: ``O(D log D)`` per row, no loop over rows.
    """
    if norm not in ("linf", "l2"):
        raise ValueError(f"fab_projection: norm must be 'linf' or 'l2', got {norm!r}")
    if points.dim() != 2 or w.shape != points.shape or b.shape != points.shape[:1]:
        raise ValueError(f"fab_projection: expected points and w [B, D] and b [B], got {tuple(points.shape)}, "
                         f"{tuple(w.shape)}, {tuple(b.shape)}")
    r = b - (w * points).sum(1)
    sign = torch.where(r < 0, -1.0, 1.0).to(w.dtype)
    w = w * sign[:, None]  # now <w, d> = |r| is to be reached
    r = r.abs()
    aw = w.abs()
    active = aw > 0
    room = torch.where(w > 0, 1 - points, points).clamp_min(0) * active
    if norm == "linf":
        a, v = aw, room
    else:
        a = aw * aw
        v = torch.where(active, room / aw.clamp_min(torch.finfo(w.dtype).tiny), torch.zeros_like(room))
        v = v.clamp_max(torch.finfo(w.dtype).max)
    # a_i v_i = |w_i| room_i for both norms; written so to avoid 0 * inf
    gain = aw * room
    v_sorted, order = v.sort(1)
    a_sorted, gain_sorted = a.gather(1, order), gain.gather(1, order)
    cum_gain, cum_a = gain_sorted.cumsum(1), a_sorted.cumsum(1)
    total_a = cum_a[:, -1:]
    # G at the breakpoints: coordinates up to k saturated, the rest moved by v_(k)
    g_at = cum_gain + v_sorted * (total_a - cum_a)
    k = (g_at < r[:, None]).sum(1)  # the first breakpoint where G >= r (D: the box never reaches it)
    dim = points.shape[1]
    feasible = k < dim
    prev = (k - 1).clamp_min(0)[:, None]
    has_prev = (k > 0)[:, None]
    zero = torch.zeros_like(r)[:, None]
    gain_prev = torch.where(has_prev, cum_gain.gather(1, prev), zero)
    a_prev = torch.where(has_prev, cum_a.gather(1, prev), zero)
    v_prev = torch.where(has_prev, v_sorted.gather(1, prev), zero)
    v_next = v_sorted.gather(1, k.clamp_max(dim - 1)[:, None])
    lam = (r[:, None] - gain_prev) / (total_a - a_prev).clamp_min(torch.finfo(w.dtype).tiny)
    # rounding can push λ just outside its piece
    lam = torch.minimum(torch.maximum(lam, v_prev), v_next)
    lam = torch.where(feasible[:, None], lam, torch.full_like(lam, math.inf))
    if norm == "linf":
        move = torch.minimum(lam.expand_as(room), room)
    else:
        move = torch.where(active, torch.minimum(lam * aw, room), torch.zeros_like(room))
    return torch.where(active, move * w.sign(), torch.zeros_like(move))


class _TargetMargin:
    """Per-example ``z_t − z_y`` (the targeted boundary function of FAB-T), usable as the ``loss`` of
    :func:`fastdiv.sample_input_grads`, which passes the labels replicated once per sample model."""

    def __init__(self, target: torch.Tensor) -> None:
        self.target = target

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = self.target.repeat(y.shape[0] // self.target.shape[0])
        return (logits.gather(1, t[:, None]) - logits.gather(1, y[:, None])).squeeze(1)


class FAB(Attack):
    """FAB-T, the targeted Fast Adaptive Boundary attack (ℓ∞ or ℓ2) with EOT, as AutoAttack runs it
    (see the module docstring for the algorithm).

    Args:
        eps: radius of the threat model (default 8/255): a point found by FAB counts only if its
            perturbation norm is at most eps.
        steps: FAB iterations per target class and restart (default 100, AutoAttack's).
        norm: 'linf' (default) or 'l2'.
        n_target_classes: how many runner-up classes are targeted in turn (default 9, AutoAttack's
            standard version); must be smaller than the number of classes.
        restarts: runs per target class (>= 1, default 1 as in AutoAttack's FAB-T); the first starts at
            the clean input, the later ones at a random point at ℓp distance eps/2 (as AutoAttack).
        alpha_max: the largest bias α towards the clean input (default 0.1). eta: the extrapolation
            η of the projection steps (default 1.05). beta: the backward step β towards the clean input
            after a success (default 0.9). All three AutoAttack's defaults.
        eot, eot_samples, seed, strategy, model_mode, stochastic: see :class:`~fastdiv.attacks.Attack`.
            With EOT the boundary function ``z_t − z_y`` and its gradient are the means over the step's
            sample models; an iterate is a success when the ensemble prediction (mean softmax) of the
            sample models evaluated at it is wrong (with eot='one' that is one sample model).

    The targets are ranked by the clean ensemble prediction (mean softmax over ``num_samples``
    sample models; the fixed one for eot='fixed'). Points the model already misclassifies there are
    not attacked.

        final: what to return for a success (a point found within eps). 'eps' (default): the point
            moved out along its perturbation to the eps-sphere (clipped to [0, 1]) if that raises the
            ensemble margin ``max_{j≠y} p̄_j − p̄_y`` on one evaluation of ``num_samples`` sample models
            shared by both points, else the point found; for a randomized model this keeps FAB's
            boundary points from being undone by the next draw of sample models, for a deterministic
            one it changes which misclassified point is returned, never whether. 'minimal': the
            smallest-norm misclassified point found, as AutoAttack returns it.

    Returns the adversarial batch: per example a misclassified point within eps if FAB found one
    (see ``final``), else the clean input (FAB's points farther than eps do not count, as in
    AutoAttack's evaluation at eps). The result is always in the eps-ball and in [0, 1].

    Raises ValueError when the model has fewer than 2 classes, when ``n_target_classes`` is not
    smaller than the number of classes, and when the model has no input gradient (its output does
    not depend differentiably on the input, or the gradient of ``z_t − z_y`` is zero at every point
    of the batch at the start of a run, as behind a rounding front end): FAB follows gradients and
    would find nothing there.
    """

    def __init__(self, model, eps: float = 8 / 255, steps: int = 100, *, norm: str = "linf",
                 n_target_classes: int = 9, restarts: int = 1, alpha_max: float = 0.1, eta: float = 1.05,
                 beta: float = 0.9, final: str = "eps", **kw) -> None:
        super().__init__(model, eps, norm=norm, **kw)
        fn = self.name
        self.steps = _check_int(steps, "steps", fn)
        self.n_target_classes = _check_int(n_target_classes, "n_target_classes", fn)
        self.restarts = _check_int(restarts, "restarts", fn)
        self.alpha_max = _check_number(alpha_max, "alpha_max", fn)
        if self.alpha_max > 1:
            raise ValueError(f"{fn}: alpha_max must be in [0, 1], got {alpha_max!r}")
        self.eta = _check_number(eta, "eta", fn, strict=True)
        self.beta = _check_number(beta, "beta", fn, strict=True)
        if self.beta > 1:
            raise ValueError(f"{fn}: beta must be in (0, 1], got {beta!r}")
        self.final = _check_choice(final, "final", fn, FINALS)

    # -- pieces ------------------------------------------------------------------------------------

    def _boundary(self, x, y, target, call):
        """(mean ``z_t − z_y`` [B], its mean input gradient [B, D], ensemble prediction wrong [B]) at x."""
        try:
            grads, logits = self._grads(x, y, call, _TargetMargin(target))
        except RuntimeError as err:
            if "does not require grad" not in str(err):
                raise
            raise ValueError(f"{self.name}: the model's output does not depend differentiably on its input "
                             "(no input gradient); FAB follows gradients and cannot attack such a model") from None
        f = _TargetMargin(target)(logits.flatten(0, 1), y.repeat(logits.shape[0])).view(logits.shape[:2])
        return f.mean(0), grads.mean(0).flatten(1), ensemble_margin(logits, y) > 0

    def _start(self, x0, call):
        """A random point at ℓp distance eps/2 from x0 (AutoAttack's restart start), clipped to [0, 1]."""
        if self.norm == "linf":
            t = 2 * call.rng.uniform(x0.shape, x0) - 1
        else:
            t = call.rng.normal(x0.shape, x0)
        scale = 0.5 * self.eps / _norm(t, self.norm).clamp_min(torch.finfo(t.dtype).tiny)
        return (x0 + t * scale.view(-1, *([1] * (x0.dim() - 1)))).clamp(0, 1)

    def _run(self, x0, y, target, call, random_start, check_gradient):
        """One FAB run towards ``target``: (found within eps [B], best point [B, ...])."""
        batch, shape = x0.shape[0], x0.shape
        x = self._start(x0, call) if random_start else x0
        x0f = x0.flatten(1)
        best = x0.clone()
        best_norm = torch.full((batch,), math.inf, dtype=torch.promote_types(x0.dtype, torch.float32),
                               device=x0.device)
        f, g, _ = self._boundary(x, y, target, call)
        # checked on the first run only: there the whole batch is attacked, so an all-zero gradient is
        # the model's doing, not a few points where z_t - z_y happens to be flat
        if check_gradient and not bool(g.any()):
            raise ValueError(f"{self.name}: the input gradient of z_t - z_y is zero at every point of the batch; "
                             "the model has no usable input gradient (non-differentiable or gradient-masking, "
                             "e.g. rounding its input) and FAB, which follows gradients, would find nothing")
        for k in range(self.steps):
            xf = x.flatten(1)
            # the linearized boundary f(x) + <g, z - x> = 0, i.e. <g, z> = <g, x> - f(x)
            b = (g * xf).sum(1) - f
            d = fab_projection(torch.cat((xf, x0f)), torch.cat((g, g)), torch.cat((b, b)), self.norm)
            d1, d2 = d[:batch], d[batch:]
            a1 = _norm(d1, self.norm).clamp_min(1e-8)
            a2 = _norm(d2, self.norm).clamp_min(1e-8)
            alpha = (a1 / (a1 + a2)).clamp(0, self.alpha_max)[:, None]
            xf = ((1 - alpha) * (xf + self.eta * d1) + alpha * (x0f + self.eta * d2)).clamp(0, 1)
            x = xf.view(shape)
            # the next step's evaluation also says whether the new iterate is misclassified
            f, g, wrong = self._boundary(x, y, target, call)
            dist = _norm(x - x0, self.norm)
            better = wrong & (dist < best_norm)
            best[better], best_norm[better] = x[better], dist[better]
            if bool(wrong.any()):
                # back towards x0 by beta, and re-linearize there (only those examples)
                idx = wrong.nonzero().squeeze(1)
                x = x.clone()
                x[idx] = x0[idx] + self.beta * (x[idx] - x0[idx])
                if k + 1 < self.steps:
                    f_i, g_i, _ = self._boundary(x[idx], y[idx], target[idx], call.subset(idx))
                    f, g = f.clone(), g.clone()
                    f[idx], g[idx] = f_i, g_i
        return best_norm <= self.eps, best

    # -- the attack --------------------------------------------------------------------------------

    def _attack(self, x0, y, call):
        seed = call.fixed_seed if self.eot == "fixed" else call.rng.seed()
        logits = self._sample_logits(x0, call, seed)
        classes = logits.shape[-1]
        if classes < 2:
            raise ValueError(f"{self.name}: the model must have at least 2 classes, it has {classes}")
        if self.n_target_classes >= classes:
            raise ValueError(f"{self.name}: n_target_classes must be smaller than the number of classes "
                             f"({classes}), got {self.n_target_classes}")
        self._check_labels(y, classes)
        # runner-up classes by the clean ensemble prediction, the true class excluded
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1).mean(0)
        probs = probs.scatter(1, y[:, None], -math.inf)
        ranking = probs.sort(dim=1, descending=True, stable=True).indices
        robust = ensemble_margin(logits, y) <= 0
        x_adv = x0.clone()
        for j in range(self.n_target_classes):
            for r in range(self.restarts):
                idx = robust.nonzero().squeeze(1)
                if idx.numel() == 0:
                    break
                found, best = self._run(x0[idx], y[idx], ranking[idx, j], call.subset(idx), random_start=r > 0,
                                         check_gradient=j == 0 and r == 0)
                x_adv[idx[found]] = best[found]
                robust[idx[found]] = False
        return self._push_to_eps(x0, x_adv, y, call, ~robust) if self.final == "eps" else x_adv

    def _push_to_eps(self, x0, x_adv, y, call, attacked):
        """Each success moved out along its perturbation to the eps-sphere, where that gives a larger
        ensemble margin. FAB's points sit just past the linearized boundary (overshoot η = 1.05): a
        deterministic model misclassifies them, but the sample models of a randomized one split about
        evenly there, so a fresh evaluation often undoes the success. The budget left up to eps buys
        margin; the margins of both points come from the same sample models, so a deterministic model
        keeps a misclassified point either way."""
        idx = (attacked & (_norm(x_adv - x0, self.norm) > 0)).nonzero().squeeze(1)
        if idx.numel() == 0:
            return x_adv
        x0_i, found = x0[idx], x_adv[idx]
        delta = found - x0_i
        # a hair inside the sphere: x0 + delta rounds, and a point must not land just outside eps
        scale = self.eps * (1 - 1e-5) / _norm(delta, self.norm)
        pushed = (x0_i + delta * scale.view(-1, *([1] * (delta.dim() - 1)))).clamp(0, 1)
        seed = call.fixed_seed if self.eot == "fixed" else call.rng.seed()
        margins = ensemble_margin(self._sample_logits(torch.cat((found, pushed)), call.subset(torch.cat((idx, idx))),
                                                      seed),
                                  torch.cat((y[idx], y[idx])))
        better = (margins[idx.numel():] > margins[:idx.numel()]) & (_norm(pushed - x0_i, self.norm) <= self.eps)
        x_adv[idx[better]] = pushed[better]
        return x_adv
