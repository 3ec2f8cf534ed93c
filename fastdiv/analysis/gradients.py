"""Gradient analysis: concentration statistics of input-gradient samples (GradDiv §3-4), their 2-D
projection and cosine matrix, LPD's ensemble-diversity measures and GAAS with regular Hadamard
directions (GAL §4.4)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..grads import sample_input_grads
from ..losses import concentration_stats
from ..nn.randomness import is_stochastic
from .predict import _chunks, derive_seed, predict_correct

#: The per-example concentration statistics, in report order (names of :class:`fastdiv.ConcentrationStats`
#: fields plus the mean gradient norm).
STAT_NAMES = ("kappa", "rho", "mean_cos", "dpp", "coherence", "rho_q", "grad_norm")

#: Upper bound on the elements of one ``[n, B, D]`` gradient block.
MAX_GRAD_ELEMENTS = 1 << 24


def _grad_batch(num_samples: int, feature_size: int, batch_size: int) -> int:
    return max(1, min(batch_size, MAX_GRAD_ELEMENTS // max(1, num_samples * feature_size)))


def _sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_samples: int, seed: int,
                  members: list[nn.Module] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grads [n, B, ...], logits [n, B, C])`` of n sample models, or of each member once (a
    population's sample models dispatch every example to a random member, so its members are
    differentiated directly)."""
    if members is None:
        grads, logits = sample_input_grads(model, x, y, num_samples, generator=seed)
        return grads.detach(), logits.detach()
    pairs = [sample_input_grads(m, x, y, 1, generator=derive_seed(seed, i)) for i, m in enumerate(members)]
    return torch.cat([g for g, _ in pairs]).detach(), torch.cat([z for _, z in pairs]).detach()


def gradient_stats(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_samples: int, seed: int,
                   *, batch_size: int = 256, members: list[nn.Module] | None = None) -> dict[str, torch.Tensor]:
    """Per-example concentration statistics of ``num_samples`` input-gradient samples (GradDiv §3-4),
    or of the members' gradients when ``members`` is given.

    Returns ``{name: [B] float32 tensor}`` for :data:`STAT_NAMES`: κ̂ (``kappa``, with p = the input
    dimension), the mean resultant length ρ̂ (``rho``), the ℓ1-MRL (``rho_q``), the mean pairwise
    cosine, the DPP loss ``-log det(C + εI)``, the coherence (max pairwise cosine, GAL eq. 7) and the
    mean gradient norm. Needs at least 2 samples.
    """
    n = len(members) if members is not None else num_samples
    if n < 2:
        raise ValueError(f"gradient_stats: needs at least 2 gradient samples to measure concentration, got {n}")
    out: dict[str, list[torch.Tensor]] = {k: [] for k in STAT_NAMES}
    step = _grad_batch(n, x[0].numel() if x.shape[0] else 1, batch_size)
    for sl in _chunks(x.shape[0], step):
        grads, _ = _sample_grads(model, x[sl], y[sl], n, seed, members)
        grads = grads.float()
        st = concentration_stats(grads, sample_dim=0)
        for name in st._fields:
            out[name].append(getattr(st, name).float())
        out["grad_norm"].append(grads.flatten(2).norm(dim=-1).mean(0))
    return {k: (torch.cat(v) if v else x.new_zeros(0)) for k, v in out.items()}


def gradient_samples_at(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_samples: int,
                        seed: int, *, members: list[nn.Module] | None = None) -> torch.Tensor:
    """``num_samples`` input-gradient samples (or one per member) at one example ``x [1, ...]``,
    flattened: ``[n, D]``."""
    grads, _ = _sample_grads(model, x, y, num_samples, seed, members)
    return grads.float().flatten(1)


def unit_mean(samples: torch.Tensor) -> torch.Tensor:
    """The sample mean of the unit-normalized rows of ``samples [n, D]`` (length = ρ̂)."""
    return _unit_rows(samples.float()).mean(0)


def _unit_rows(v: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    norms = v.norm(dim=-1, keepdim=True)
    return torch.where(norms > eps, v / norms.clamp_min(eps), torch.zeros_like(v))


def projection_basis(*directions: torch.Tensor, samples: torch.Tensor | None = None) -> torch.Tensor:
    """An orthonormal 2-D basis ``[2, D]`` for projecting gradient samples (GradDiv Fig. 4).

    With two directions (the sample mean vectors of two models) the plane they span, in
    Gram–Schmidt order; with one direction, that direction and the first principal axis of
    ``samples`` orthogonal to it; with none, the first two principal axes of ``samples``. Degenerate
    directions (zero, or parallel to the first) are replaced by principal axes.
    """
    basis: list[torch.Tensor] = []
    for d in directions:
        v = d.flatten().double()
        for b in basis:
            v = v - (v @ b) * b
        if v.norm() > 1e-8 * max(1.0, float(d.double().norm())):
            basis.append(v / v.norm())
        if len(basis) == 2:
            break
    if len(basis) < 2:
        if samples is None:
            raise ValueError("projection_basis: needs two independent directions or samples for the principal axes")
        rest = samples.flatten(1).double()
        rest = rest - rest.mean(0, keepdim=True)
        for b in basis:
            rest = rest - (rest @ b)[:, None] * b
        _, _, vh = torch.linalg.svd(rest, full_matrices=False)
        for v in vh:
            for b in basis:
                v = v - (v @ b) * b
            if v.norm() > 1e-8:
                basis.append(v / v.norm())
            if len(basis) == 2:
                break
    while len(basis) < 2:  # rank-deficient samples (e.g. identical gradients): any orthonormal completion
        e = torch.zeros_like(basis[0]) if basis else torch.zeros(samples.shape[-1], dtype=torch.float64)
        for i in range(e.numel()):
            v = torch.zeros_like(e)
            v[i] = 1.0
            for b in basis:
                v = v - (v @ b) * b
            if v.norm() > 1e-6:
                basis.append(v / v.norm())
                break
    return torch.stack(basis).float()


def project(samples: torch.Tensor, basis: torch.Tensor) -> dict:
    """Unit-normalized gradient samples ``[n, D]`` projected on ``basis [2, D]``.

    Returns ``{'points': [n, 2], 'mean': [2], 'rho': float}``: the projected unit vectors, the
    projected sample mean of the unit vectors, and its full-dimensional length ρ̂ (the sample MRL).
    """
    u = _unit_rows(samples.float())
    mean = u.mean(0)
    return {"points": (u @ basis.T.to(u)).cpu(), "mean": (mean @ basis.T.to(u)).cpu(), "rho": float(mean.norm())}


def cosine_matrix(samples: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities ``[n, n]`` of gradient samples ``[n, D]`` (GradDiv Fig. 8)."""
    u = _unit_rows(samples.double())
    return (u @ u.T).clamp(-1, 1).float()


def ambiguity_entropy(correct: torch.Tensor) -> float:
    """LPD eq. (7): ``E = (1/N) Σ_i min(l_i, K − l_i) / (K − ⌈K/2⌉)`` from member correctness
    ``[K, N]`` (``l_i`` = how many of the K members classify example i correctly). 0 = the members
    always agree; 1 = maximal disagreement."""
    k, n = correct.shape
    if k < 2:
        raise ValueError(f"ambiguity_entropy: needs K >= 2 members, got {k}")
    if n == 0:
        return 0.0
    votes = correct.sum(0).double()
    return float(torch.minimum(votes, k - votes).mean() / (k - math.ceil(k / 2)))


def member_diversity(model: nn.Module, x: torch.Tensor, y: torch.Tensor, k: int, seed: int,
                     *, batch_size: int = 256, members: list[nn.Module] | None = None) -> dict[str, torch.Tensor]:
    """Per-example ensemble-diversity measures of LPD §4 over K sample models, or over the members
    when ``members`` is given (K = len(members)).

    Returns ``{'correct': [K, B] bool, 'l_d': [B], 'l_s': [B]}``: each member's clean correctness
    (for the ambiguity entropy, :func:`ambiguity_entropy`), ``L_d = Σ_{i<j} cos(g_i, g_j)`` and
    ``L_s = Σ_k ‖g_k‖₂`` of the members' input gradients.
    """
    k = len(members) if members is not None else k
    if k < 2:
        raise ValueError(f"member_diversity: needs K >= 2 members or sample models, got {k}")
    correct, l_d, l_s = [], [], []
    step = _grad_batch(k, x[0].numel() if x.shape[0] else 1, batch_size)
    for sl in _chunks(x.shape[0], step):
        grads, logits = _sample_grads(model, x[sl], y[sl], k, seed, members)
        g = grads.float().flatten(2)  # [K, B, D]
        correct.append(logits.argmax(-1) == y[sl])
        u = _unit_rows(g.transpose(0, 1))  # [B, K, D]
        cos = u @ u.transpose(1, 2)
        iu = torch.triu_indices(k, k, offset=1, device=cos.device)
        l_d.append(cos[:, iu[0], iu[1]].sum(-1))
        l_s.append(g.norm(dim=-1).sum(0))
    if not correct:
        z = x.new_zeros(0)
        return {"correct": torch.zeros(k, 0, dtype=torch.bool, device=x.device), "l_d": z, "l_s": z}
    return {"correct": torch.cat(correct, 1), "l_d": torch.cat(l_d), "l_s": torch.cat(l_s)}


def regular_hadamard(k: int) -> torch.Tensor:
    """A regular Hadamard matrix of order ``k = 4^m`` (m >= 1): entries ±1, ``H Hᵀ = k I`` and every
    row sums to ``√k`` (so each row, multiplied into ``sign(∇x)``, is aligned with the gradient).
    Built as Kronecker powers of ``J₄ − 2I₄``."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 4 or 4 ** round(math.log(k, 4)) != k:
        raise ValueError(f"regular_hadamard: k must be a power of 4 (4, 16, 64, 256, ...), got {k!r}")
    h4 = torch.ones(4, 4) - 2 * torch.eye(4)
    h = h4
    while h.shape[0] < k:
        h = torch.kron(h, h4)
    return h


def _eot_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_samples: int, seed: int) -> torch.Tensor:
    grads, _ = sample_input_grads(model, x, y, num_samples if is_stochastic(model, x) else 1, generator=seed)
    return grads.detach().mean(0)


def gaas(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, ks: Sequence[int], eps: Sequence[float],
         grad_samples: int, pred_samples: int, seed: int, clip: tuple[float, float] = (0.0, 1.0),
         batch_size: int = 128) -> torch.Tensor:
    """Gradient Aligned Adversarial Subspace (Tramèr et al. 2017; GAL §4.4) with regular Hadamard
    directions.

    For each example, the attacker's gradient estimate ``g`` (the mean of ``grad_samples`` sample
    gradients) gives ``k`` orthogonal ℓ∞ directions ``r_i = ε · sign(g) ⊙ h_i``, where ``h_i`` is row i
    of a regular Hadamard matrix of order k expanded over k contiguous blocks of the flattened input
    (exactly orthogonal when k divides the input size). Returns ``[len(eps), len(ks), B]`` int64: how
    many of the k directions are adversarial (ensemble prediction over ``pred_samples`` samples)
    at ``clip(x + r_i)``.
    """
    d = x[0].numel() if x.shape[0] else 0
    bad = [k for k in ks if k > max(d, 1)]
    if bad:
        raise ValueError(f"gaas: k must not exceed the input size {d}, got {bad}")
    out = torch.zeros(len(eps), len(ks), x.shape[0], dtype=torch.int64, device=x.device)
    if x.shape[0] == 0:
        return out
    pred_seed = derive_seed(seed, 1)
    for sl in _chunks(x.shape[0], batch_size):
        xb, yb = x[sl], y[sl]
        sign = torch.sign(_eot_gradient(model, xb, yb, grad_samples, seed)).flatten(1)  # [b, D]
        for ki, k in enumerate(ks):
            h = regular_hadamard(k).to(xb)
            block = (torch.arange(d, device=xb.device) * k) // d  # feature -> Hadamard column
            dirs = h[:, block]  # [k, D]
            for ei, e in enumerate(eps):
                pert = (e * sign[None] * dirs[:, None]).view(k * xb.shape[0], *xb.shape[1:])
                xa = (xb.repeat(k, *([1] * (xb.dim() - 1))) + pert).clamp(*clip)
                ok, _ = predict_correct(model, xa, yb.repeat(k), pred_samples, pred_seed)
                out[ei, ki, sl] = (~ok).view(k, xb.shape[0]).sum(0)
    return out


def quantiles(values: torch.Tensor, qs: Sequence[float] = (0.25, 0.5, 0.75)) -> dict[str, float]:
    """``{'25%': ..., '50%': ..., '75%': ...}`` of a 1-D tensor (linear interpolation)."""
    v = values.double().flatten()
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return {f"{round(q * 100)}%": None for q in qs}
    return {f"{round(q * 100)}%": float(torch.quantile(v, q)) for q in qs}
