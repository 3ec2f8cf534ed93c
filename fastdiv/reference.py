"""Plain-PyTorch reference implementations, written straight from the papers' formulas.

Every function here normalizes the gradients first and then evaluates the formula as printed, with
ordinary autograd-differentiable PyTorch ops and no fusion. They are the ``backend='torch'`` path of
the public API, the oracle the tests compare the compiled kernels against, and the baseline the
benchmarks time. They return one value per input (shape ``[B]``); reductions are applied by the
public wrappers in :mod:`fastdiv.losses`.

All functions take ``grads`` shaped ``[B, n, *features]``: row ``grads[b, i]`` is the input gradient
of sample model ``i`` at input ``b``. Features are flattened to ``D = prod(features)``.

Papers (full citations in docs/design.md §7):
  GradDiv (Lee, Kim & Lee, IEEE TPAMI 2022, arXiv:2107.02425): eq. 16 (R_kappa), 17 (R_mean),
    19 (R_DPP), supplement (R_max, R_smoothmax).
  Diversity Training (Kariyappa & Qureshi 2019, arXiv:1901.09981): GAL = log sum_{a<b} exp cos(g_a, g_b).
  Defense through Diverse Directions (Bender et al., ICML 2020, arXiv:2003.10602): eq. 14 (Omega_M),
    15-17 (Omega_V), 18 (Omega_S).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

#: Floor on gradient norms. A gradient whose norm is at most EPS has no direction: its unit vector is
#: the zero vector and it receives zero gradient. (``F.normalize``'s ``g / max(||g||, eps)`` would give
#: it a derivative of 1/eps, which overflows float16 and, squared inside the Gram heads, float32.)
EPS = 1e-12
#: Default diagonal jitter of R_DPP: ``-log det(C + JITTER * I)``. Fully aligned rows give a finite
#: loss ``-(n-1) log(JITTER) - log(n + JITTER)`` (about 80.6 for n = 10) and a finite gradient, while
#: orthogonal rows give ``-n log(1 + JITTER) ~ -n * 1e-4 ~ 0``. 1e-4 is ~100x above the rounding error
#: of fp32-accumulated cosines, so the Cholesky factorization never meets a non-positive pivot.
JITTER = 1e-4
#: R_kappa clamps the mean resultant length at RHO_MAX < 1, where kappa_hat = rho(p-rho)/(1-rho^2)
#: would divide by zero. Above the clamp the loss is constant (zero gradient); 1 - 1e-6 keeps that dead
#: zone to cosines above ~0.999999 while staying well above fp32 rounding of rho.
RHO_MAX = 1.0 - 1e-6

VARIANCE_KINDS = ("target", "min", "softmin")


def _head_dtype(x: torch.Tensor) -> torch.dtype:
    """The n x n heads run in at least fp32 (linalg has no half kernels, and half would lose the loss)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


#: Row scaling (fastdiv/csrc/head_math.h, "Row scaling"): a row whose largest |g_k| is outside
#: [2^-safe, 2^safe] is used as s g with s the power of two that brings its maximum into [0.5, 1), so its
#: squares neither overflow (fp32: |g| ~ 1e19) nor flush to zero (|g| ~ 1e-23); s is exact and every loss
#: depends on g / ||g|| only. (safe, largest |exponent| of s) per head dtype.
ROW_SCALE_EXPONENTS = {torch.float32: (40, 126), torch.float64: (450, 1022)}


def row_scale(x: torch.Tensor, per_input: bool = False) -> torch.Tensor:
    """Per-row powers of two ``s`` ([..., 1], x's dtype, no gradient) for rows ``x`` [..., D] of a float32
    or float64 tensor. A row needs a scale when its largest |x| is finite, nonzero and outside the safe
    range; its scale is 2^-e for max |x| = f 2^e, f in [0.5, 1), e clamped so that s stays a normal number.
    Other rows get 1 (all-zero rows and rows with NaN or Inf, which must give NaN, always do). With
    ``per_input`` (x [B, n, D]), every row of an input with a row that needs a scale gets its 2^-e, as the
    compiled Gram losses scale them (fastdiv/csrc/head_math.h, "Row scaling")."""
    safe, limit = ROW_SCALE_EXPONENTS[torch.float64 if x.dtype == torch.float64 else torch.float32]
    m = x.detach().abs().amax(dim=-1, keepdim=True)
    _, e = torch.frexp(m)
    s = torch.ldexp(torch.ones_like(m), (-e).clamp(-limit, limit))
    scalable = torch.isfinite(m) & (m > 0)
    needs = scalable & ~((m >= 2.0**-safe) & (m <= 2.0**safe))
    if per_input:
        needs = scalable & needs.any(dim=-2, keepdim=True)
    return torch.where(needs, s, torch.ones_like(m))


def normalize(grads: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """u = g / ||g||_2 over the flattened feature dims (0 where ||g|| <= eps); shape and dtype of ``grads``."""
    return unit_rows(grads, eps).to(grads.dtype).reshape(grads.shape)


def unit_rows(grads: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Unit gradient directions flattened to ``[B, n, D]``, computed in at least fp32 (eps = 1e-12 is
    not representable in half precision); rows with norm <= eps become zero. Rows out of the range of
    their squares are rescaled first (row_scale): u = y / ||y|| for y = s g, with the floor
    ||g|| = ||y|| / s <= eps."""
    x = grads.flatten(2).to(_head_dtype(grads))
    s = row_scale(x)
    y = x * s
    r = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
    floor = eps * s
    # r <= floor (not r > floor) lets a NaN norm select y / r and reach the output; the clamp keeps the
    # unselected branch finite, so its zero gradient is not 0 * inf = NaN
    return torch.where(r <= floor, torch.zeros_like(y), y / torch.maximum(r, floor))


def cosine_gram(grads: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """C_ij = cos(g_i, g_j) = <u_i, u_j>, shape ``[B, n, n]``."""
    u = unit_rows(grads, eps)
    return u @ u.transpose(1, 2)


def _off_diagonal(n: int, device) -> torch.Tensor:
    return ~torch.eye(n, dtype=torch.bool, device=device)


def dpp_loss(grads: torch.Tensor, jitter: float = JITTER, eps: float = EPS) -> torch.Tensor:
    """GradDiv eq. 19: R_DPP = -log det(G^T G) over unit gradients G, with ``jitter * I`` added."""
    c = cosine_gram(grads, eps).to(_head_dtype(grads))
    n = c.shape[-1]
    eye = torch.eye(n, dtype=c.dtype, device=c.device)
    return -torch.logdet(c + jitter * eye)


def mean_cosine_loss(grads: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """GradDiv eq. 17: R_mean = 1/(n(n-1)) sum_{i != j} cos(g_i, g_j)."""
    c = cosine_gram(grads, eps).to(_head_dtype(grads))
    n = c.shape[-1]
    return (c * _off_diagonal(n, c.device)).sum(dim=(-2, -1)) / (n * (n - 1))


def mean_resultant_length(grads: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Sample MRL rho_hat = || (1/n) sum_i u_i ||_2 (GradDiv §3)."""
    u = unit_rows(grads, eps).to(_head_dtype(grads))
    return torch.linalg.vector_norm(u.mean(dim=1), dim=-1)


def kappa_hat(rho: torch.Tensor, p: float, rho_max: float = RHO_MAX) -> torch.Tensor:
    """kappa_hat = rho (p - rho) / (1 - rho^2), with rho clamped at ``rho_max`` (see RHO_MAX)."""
    rho = rho.clamp(max=rho_max)
    return rho * (p - rho) / (1 - rho * rho)


def kappa_loss(grads: torch.Tensor, p: float | None = None, rho_max: float = RHO_MAX,
               eps: float = EPS) -> torch.Tensor:
    """GradDiv eq. 16: R_kappa = kappa_hat / p; p defaults to the feature dimension D."""
    p = float(grads.flatten(2).shape[-1] if p is None else p)
    return kappa_hat(mean_resultant_length(grads, eps), p, rho_max) / p


def max_cosine_loss(grads: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """GradDiv supplement: R_max = max_{i != j} cos(g_i, g_j)."""
    c = cosine_gram(grads, eps).to(_head_dtype(grads))
    n = c.shape[-1]
    return c.masked_fill(~_off_diagonal(n, c.device), float("-inf")).amax(dim=(-2, -1))


def smoothmax_cosine_loss(grads: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """GradDiv supplement: R_smoothmax = log sum_{i != j} exp cos(g_i, g_j)."""
    c = cosine_gram(grads, eps).to(_head_dtype(grads))
    n = c.shape[-1]
    return c.masked_fill(~_off_diagonal(n, c.device), float("-inf")).flatten(1).logsumexp(dim=-1)


def gal_loss(grads: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Diversity Training: GAL = log sum_{a<b} exp cos(g_a, g_b)."""
    c = cosine_gram(grads, eps).to(_head_dtype(grads))
    n = c.shape[-1]
    a, b = torch.triu_indices(n, n, offset=1, device=c.device)
    return c[:, a, b].logsumexp(dim=-1)


def mean_penalty(grads: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Diverse Directions eq. 14: Omega_M = sum_d E[u_d]^2 (expectation over the n draws)."""
    u = unit_rows(grads, eps).to(_head_dtype(grads))
    return u.mean(dim=1).square().sum(dim=-1)


def column_variance(grads: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Var[u_d] over the n draws (population variance, 1/n, as in eq. 12-13), shape ``[B, D]``."""
    u = unit_rows(grads, eps).to(_head_dtype(grads))
    return u.var(dim=1, unbiased=False)


def variance_head(var: torch.Tensor, kind: str = "target", temperature: float | None = None) -> torch.Tensor:
    """Omega_V from the per-dimension variances ``var`` [B, D].

    kind='target'  eq. 17: sum_d (Var[u_d] - 1/D)^2 (the paper's chosen penalty).
    kind='min'     eq. 15: -min_d Var[u_d].
    kind='softmin' eq. 16: -sum_d softmin_d(Var / temperature) Var[u_d]. The paper writes the weight as
                   softmin(alpha u_{y,d}) with alpha "the temperature"; a per-dimension weight can only
                   be a function of the per-dimension variance, so we read it as a softmin over d of
                   Var[u_d] / temperature (alpha = 1 / temperature). The default temperature is 1/D,
                   the variance of a uniformly spread unit vector, so the weights are neither uniform
                   nor a hard min at typical scales.
    """
    d = var.shape[-1]
    if kind == "target":
        return (var - 1.0 / d).square().sum(dim=-1)
    if kind == "min":
        return -var.amin(dim=-1)
    if kind == "softmin":
        t = 1.0 / d if temperature is None else temperature
        return -(torch.softmax(-var / t, dim=-1) * var).sum(dim=-1)
    raise ValueError(f"kind: expected one of {VARIANCE_KINDS}, got {kind!r}")


def variance_penalty(grads: torch.Tensor, kind: str = "target", temperature: float | None = None,
                     eps: float = EPS) -> torch.Tensor:
    """Diverse Directions Omega_V (eq. 17 by default; eq. 15 / 16 via ``kind``)."""
    return variance_head(column_variance(grads, eps), kind, temperature)


def sparsity_penalty(grads: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Diverse Directions eq. 18: Omega_S = -E ||u||_1."""
    u = unit_rows(grads, eps).to(_head_dtype(grads))
    return -u.abs().sum(dim=-1).mean(dim=1)


class ConcentrationStats(NamedTuple):
    """Per-input concentration statistics of n gradient samples; every field has shape ``[B]``."""

    rho: torch.Tensor        #: sample mean resultant length ||mean_i u_i||_2
    rho_q: torch.Tensor      #: sample l_q-MRL ||mean_i u_i||_q
    kappa: torch.Tensor      #: kappa_hat = rho (D - rho) / (1 - rho^2), rho clamped at rho_max
    mean_cos: torch.Tensor   #: mean_{i != j} cos(g_i, g_j)
    coherence: torch.Tensor  #: max_{i != j} cos(g_i, g_j)
    dpp: torch.Tensor        #: -log det(C + jitter I)


def concentration_stats(grads: torch.Tensor, q: float = 1.0, jitter: float = JITTER,
                        rho_max: float = RHO_MAX, eps: float = EPS) -> ConcentrationStats:
    """All concentration statistics of GradDiv §3-4 for each input."""
    u = unit_rows(grads, eps).to(_head_dtype(grads))
    d = u.shape[-1]
    mean = u.mean(dim=1)
    rho = torch.linalg.vector_norm(mean, dim=-1)
    return ConcentrationStats(
        rho=rho,
        rho_q=torch.linalg.vector_norm(mean, ord=q, dim=-1),
        kappa=kappa_hat(rho, float(d), rho_max),
        mean_cos=mean_cosine_loss(grads, eps),
        coherence=max_cosine_loss(grads, eps),
        dpp=dpp_loss(grads, jitter, eps),
    )


# ---------------------------------------------------------------------------------------------------
# The EOT attack step (docs/design.md §2.6), the oracle of the fused ``eot_step`` kernels.
# ---------------------------------------------------------------------------------------------------

EOT_NORMS = ("linf", "l2")


def _inv_or_zero(norm: torch.Tensor) -> torch.Tensor:
    """1 / norm, 0 where the norm is 0 (no direction), NaN where it is NaN."""
    return torch.where(norm == 0, torch.zeros_like(norm), 1.0 / norm)


def _per_example_column(value, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A scalar or a [B] tensor as a [B, 1] column."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=dtype).reshape(-1, 1).expand(batch, 1)
    return torch.full((batch, 1), float(value), dtype=dtype, device=device)


def eot_step(x: torch.Tensor, x0: torch.Tensor, grads: torch.Tensor, *, alpha, eps, norm: str = "linf",
             clip: tuple[float, float] | None = (0.0, 1.0), sample_dim: int = 0,
             momentum: torch.Tensor | None = None, decay: float = 1.0):
    """One step of EOT-PGD / EOT-MI-FGSM on a batch, as the formulas read (no validation, no fusion).

    ``x``, ``x0``: [B, *features] (current and clean inputs); ``grads``: [n, B, *features]
    (``sample_dim=0``) or [B, n, *features] (``sample_dim=1``). With g = mean of the n gradients:
    ``v = g``, or with ``momentum`` ``v = m_new = decay * m + g / ||g||_1`` (0 where ||g||_1 = 0);
    direction = sign(v) (l_inf) or v / ||v||_2 (l2; 0 where ||v|| = 0); then
    ``x_new = clip(x0 + P(x + alpha * direction - x0))`` with P the projection onto the eps-ball
    (element clamp for l_inf, scaling by min(1, eps / ||delta||_2) for l2). Norms are per example over
    all features. Computed in float32 (float64 if any input is float64); NaN in v propagates (unlike
    ``torch.sign``, which maps NaN to 0). Returns ``x_new`` (x's dtype), or ``(x_new, m_new)`` with
    ``momentum`` (momentum's dtype).
    """
    dtypes = (x.dtype, x0.dtype, grads.dtype)
    acc = torch.float64 if torch.float64 in dtypes else torch.float32
    b = x.shape[0]
    xf = x.detach().to(acc).flatten(1)
    x0f = x0.detach().to(acc).flatten(1)
    g = grads.detach().to(acc).mean(dim=sample_dim).flatten(1)
    a = _per_example_column(alpha, b, acc, x.device)
    e = _per_example_column(eps, b, acc, x.device)
    v = g
    if momentum is not None:
        l1 = g.abs().sum(dim=1, keepdim=True)
        v = decay * momentum.detach().to(acc).flatten(1) + g * _inv_or_zero(l1)
    if norm == "linf":
        direction = torch.where(torch.isnan(v), v, torch.sign(v))
        delta = torch.clamp(xf + a * direction - x0f, -e, e)
    elif norm == "l2":
        direction = v * _inv_or_zero(torch.linalg.vector_norm(v, dim=1, keepdim=True))
        delta = xf + a * direction - x0f
        dn = torch.linalg.vector_norm(delta, dim=1, keepdim=True)
        delta = delta * torch.where(dn > e, e / dn, torch.ones_like(dn))
    else:
        raise ValueError(f"eot_step: norm must be one of {EOT_NORMS}, got {norm!r}")
    out = x0f + delta
    if clip is not None:
        out = out.clamp(float(clip[0]), float(clip[1]))
    out = out.to(x.dtype).reshape(x.shape)
    if momentum is None:
        return out
    return out, v.to(momentum.dtype).reshape(momentum.shape)
