"""The gradient-diversity regularizers of the papers as differentiable, fused ops.

Every function takes ``grads``: the input gradients of n sample models at B inputs, shaped
``[B, n, *features]`` (``sample_dim=1``, the default) or ``[n, B, *features]`` (``sample_dim=0``, what a
sample-batched backward returns; no copy is made). Features are flattened to D values. Rows are
normalized to unit length first, ``u_i = g_i / ||g_i||``; a gradient whose norm is at most ``eps``
(an all-zero gradient, say) has no direction: its u is the zero vector and it receives zero gradient, so
zero or duplicate rows never produce NaN or Inf. Finite ``grads`` give finite results at any scale: rows
whose squares would overflow or underflow the accumulation dtype (fp32: |g| ~ 1e19 or ~1e-23) are
rescaled by a power of two first, so every backend gives the float64 values of the same data (up to
rounding), gradients included. NaN or Inf in ``grads`` give NaN in the result (no error).

Losses return one value per input reduced with ``reduction`` ('mean' over the batch, the default;
'sum'; or 'none' for the ``[B]`` vector) in float32 (float64 for float64 inputs, whatever the input
precision: half-precision inputs are read as half and accumulated in float32). The mean over an empty
batch is 0.

``backend``: 'auto' (default; the compiled kernels when built, overridable with the environment
variable FASTDIV_BACKEND), 'cpu', 'cuda', 'triton' or 'torch' (the plain reference in
:mod:`fastdiv.reference`). Inputs are never modified.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import reference
from ._backend import resolve_backend
from ._checks import as_rows, check_open_unit, check_positive, check_reduction, reduce
from .ops import gram as gram_ops
from .ops import rows as rows_ops
from .ops.schemas import NAMESPACES
from .reference import EPS, JITTER, RHO_MAX, VARIANCE_KINDS, ConcentrationStats

__all__ = [
    "normalize", "cosine_gram", "dpp_loss", "mean_cosine_loss", "kappa_loss", "max_cosine_loss",
    "smoothmax_cosine_loss", "gal_loss", "mean_penalty", "variance_penalty", "sparsity_penalty",
    "diversity_loss", "concentration_stats", "ConcentrationStats", "DIVERSITY_LOSSES",
]


def _gram_head(fn: str, head: str, grads: torch.Tensor, reference_fn: Callable, *, reduction: str,
               sample_dim: int, eps: float, backend: str, mean_head: Callable | None = None,
               **params) -> torch.Tensor:
    """Shared body of the Gram-family losses: validate, pick a backend, evaluate, reduce.

    ``mean_head(m, x)``: for the losses that depend on the unit rows only through their mean
    m = mean_i u_i (Omega_M = ||m||^2, R_kappa of rho = ||m||), the per-input loss on the [B, D] mean. On the
    CPU such a loss takes the O(nD) column statistics (row norms and m in one read of X; a backward of one
    read and one write, dX_i = (G - <G, u_i> u_i) / (n r_i) with G = dL/dm) instead of the n x n Gram, whose
    forward and pullback cost O(n^2 D). The CUDA and Triton backends keep their Gram kernel."""
    check_reduction(reduction, fn)
    eps = check_positive(eps, "eps", fn)
    x = as_rows(grads, sample_dim, fn)
    be = resolve_backend(backend, x, fn)
    if be == "torch":
        per_input = reference_fn(x, eps=eps, **params)
    elif be == "cpu" and mean_head is not None:
        _, mean, _ = rows_ops.column_stats(x, eps, ns=NAMESPACES[be])
        per_input = mean_head(mean, x)
    else:
        kernel_params = {k: (0.0 if v is None else v) for k, v in params.items()}
        per_input = gram_ops.gram_loss(x, head, eps=eps, ns=NAMESPACES[be], **kernel_params)
    return reduce(per_input, reduction)


def _resultant_length(mean: torch.Tensor) -> torch.Tensor:
    """rho = ||m|| per input, with a zero gradient where rho < 1e-10 (the norm has no derivative at the
    origin; the Gram kernels do the same) and NaN kept."""
    sq = mean.square().sum(dim=-1)
    away = sq > 1e-20
    return torch.where(away, torch.where(away, sq, torch.ones_like(sq)).sqrt(), sq * 0)


def normalize(grads: torch.Tensor, *, sample_dim: int = 1, eps: float = EPS, backend: str = "auto") -> torch.Tensor:
    """Unit gradient directions ``g / ||g||_2`` (norm over the features; zero where ``||g|| <= eps``),
    with the shape and dtype of ``grads``."""
    fn = "normalize"
    eps = check_positive(eps, "eps", fn)
    x = as_rows(grads, sample_dim, fn, min_samples=1)
    be = resolve_backend(backend, x, fn)
    if be == "torch":
        u = reference.unit_rows(x, eps).to(grads.dtype)
    else:
        u = rows_ops.normalize(x, eps, ns=NAMESPACES[be])
    # back to the caller's layout: [B, n, *features], or [n, B, *features] for sample_dim=0
    u = u.reshape(x.shape[:2] + grads.shape[2:])
    return u.transpose(0, 1) if sample_dim == 0 else u


def cosine_gram(grads: torch.Tensor, *, sample_dim: int = 1, eps: float = EPS, backend: str = "auto") -> torch.Tensor:
    """Cosine-similarity matrices ``C[b, i, j] = cos(g_bi, g_bj)``, shape ``[B, n, n]``."""
    fn = "cosine_gram"
    eps = check_positive(eps, "eps", fn)
    x = as_rows(grads, sample_dim, fn, min_samples=1)
    be = resolve_backend(backend, x, fn)
    if be == "torch":
        return reference.cosine_gram(x, eps).to(reference._head_dtype(x))
    # the Gram of y = s g, s the row scales of reference.row_scale (powers of two, 1 for rows whose squares
    # stay in range): the cosines are those of g, without overflow or underflow of ||g||^2
    acc = reference._head_dtype(x)
    scale = reference.row_scale(x.detach().to(acc))
    s, _ = gram_ops.gram(x * scale.to(x.dtype), ns=NAMESPACES[be])
    sq = torch.diagonal(s, dim1=1, dim2=2)
    floor = (eps * scale[:, :, 0]) ** 2  # ||g|| <= eps  <=>  ||y||^2 <= (eps s)^2
    # 1/||y|| above the norm floor, 0 at or below it (NaN selects the rsqrt branch and propagates);
    # the clamp keeps the unselected branch's gradient finite
    inv_r = torch.where(sq <= floor, torch.zeros_like(sq), torch.maximum(sq, floor).rsqrt())
    return s * inv_r[:, :, None] * inv_r[:, None, :]


def dpp_loss(grads: torch.Tensor, *, jitter: float = JITTER, reduction: str = "mean", sample_dim: int = 1,
             eps: float = EPS, backend: str = "auto") -> torch.Tensor:
    """GradDiv-DPP (eq. 19): ``R_DPP = -log det(C + jitter I)`` with C the cosine Gram of the n gradients.

    ``jitter`` (default 1e-4) keeps the loss finite for aligned or duplicate gradients: fully aligned
    rows give ``-(n-1) log(jitter) - log(n + jitter)`` (80.6 for n = 10) with a finite gradient,
    orthogonal rows give ``-n log(1 + jitter) ~ 0``.
    """
    fn = "dpp_loss"
    jitter = check_positive(jitter, "jitter", fn)
    return _gram_head(fn, "dpp", grads, reference.dpp_loss, reduction=reduction, sample_dim=sample_dim,
                      eps=eps, backend=backend, jitter=jitter)


def mean_cosine_loss(grads: torch.Tensor, *, reduction: str = "mean", sample_dim: int = 1, eps: float = EPS,
                     backend: str = "auto") -> torch.Tensor:
    """GradDiv-mean (eq. 17): ``R_mean = 1/(n(n-1)) sum_{i != j} cos(g_i, g_j)``."""
    return _gram_head("mean_cosine_loss", "mean", grads, reference.mean_cosine_loss, reduction=reduction,
                      sample_dim=sample_dim, eps=eps, backend=backend)


def kappa_loss(grads: torch.Tensor, *, p: float | None = None, rho_max: float = RHO_MAX, reduction: str = "mean",
               sample_dim: int = 1, eps: float = EPS, backend: str = "auto") -> torch.Tensor:
    """GradDiv-kappa (eq. 16): ``R_kappa = kappa_hat / p``, ``kappa_hat = rho (p - rho) / (1 - rho^2)``.

    ``rho`` is the sample mean resultant length ``||mean_i u_i||``; ``p`` defaults to the feature
    dimension D. ``rho`` is clamped at ``rho_max`` (default 1 - 1e-6) because kappa_hat diverges at
    rho = 1 (all gradients aligned): above the clamp the loss is the constant kappa_hat(rho_max) / p and
    its gradient is zero. Where the gradients cancel (rho < 1e-10) the MRL has no derivative (the norm's
    kink at the origin) and the compiled kernels return a zero gradient.
    """
    fn = "kappa_loss"
    if p is not None:
        p = check_positive(p, "p", fn)
    rho_max = check_open_unit(rho_max, "rho_max", fn)

    def head(mean, x):
        dim = float(x.shape[-1] if p is None else p)
        return reference.kappa_hat(_resultant_length(mean), dim, rho_max) / dim

    return _gram_head(fn, "kappa", grads, reference.kappa_loss, reduction=reduction, sample_dim=sample_dim,
                      eps=eps, backend=backend, mean_head=head, p=p, rho_max=rho_max)


def max_cosine_loss(grads: torch.Tensor, *, reduction: str = "mean", sample_dim: int = 1, eps: float = EPS,
                    backend: str = "auto") -> torch.Tensor:
    """GradDiv R_max (supplement): ``max_{i != j} cos(g_i, g_j)``, the coherence of the n gradients."""
    return _gram_head("max_cosine_loss", "max", grads, reference.max_cosine_loss, reduction=reduction,
                      sample_dim=sample_dim, eps=eps, backend=backend)


def smoothmax_cosine_loss(grads: torch.Tensor, *, reduction: str = "mean", sample_dim: int = 1, eps: float = EPS,
                          backend: str = "auto") -> torch.Tensor:
    """GradDiv R_smoothmax (supplement): ``log sum_{i != j} exp cos(g_i, g_j)`` (ordered pairs)."""
    return _gram_head("smoothmax_cosine_loss", "smoothmax", grads, reference.smoothmax_cosine_loss,
                      reduction=reduction, sample_dim=sample_dim, eps=eps, backend=backend)


def gal_loss(grads: torch.Tensor, *, reduction: str = "mean", sample_dim: int = 1, eps: float = EPS,
             backend: str = "auto") -> torch.Tensor:
    """Diversity Training's Gradient Alignment Loss: ``log sum_{a<b} exp cos(g_a, g_b)``
    (= R_smoothmax - log 2). The paper trains with ``mean CE + 0.5 * GAL``."""
    return _gram_head("gal_loss", "gal", grads, reference.gal_loss, reduction=reduction, sample_dim=sample_dim,
                      eps=eps, backend=backend)


def mean_penalty(grads: torch.Tensor, *, reduction: str = "mean", sample_dim: int = 1, eps: float = EPS,
                 backend: str = "auto") -> torch.Tensor:
    """Diverse Directions Omega_M (eq. 14): ``sum_d E[u_d]^2 = rho_hat^2``."""
    return _gram_head("mean_penalty", "mean_penalty", grads, reference.mean_penalty, reduction=reduction,
                      sample_dim=sample_dim, eps=eps, backend=backend,
                      mean_head=lambda mean, _: mean.square().sum(dim=-1))


def sparsity_penalty(grads: torch.Tensor, *, reduction: str = "mean", sample_dim: int = 1, eps: float = EPS,
                     backend: str = "auto") -> torch.Tensor:
    """Diverse Directions Omega_S (eq. 18): ``-E ||u||_1`` (mean over the n draws)."""
    return _gram_head("sparsity_penalty", "sparsity", grads, reference.sparsity_penalty, reduction=reduction,
                      sample_dim=sample_dim, eps=eps, backend=backend)


def variance_penalty(grads: torch.Tensor, *, kind: str = "target", temperature: float | None = None,
                     reduction: str = "mean", sample_dim: int = 1, eps: float = EPS,
                     backend: str = "auto") -> torch.Tensor:
    """Diverse Directions Omega_V over the per-dimension variances ``Var[u_d]`` of the n draws
    (population variance, 1/n):

    - ``kind='target'`` (default, eq. 17): ``sum_d (Var[u_d] - 1/D)^2``;
    - ``kind='min'`` (eq. 15): ``-min_d Var[u_d]``;
    - ``kind='softmin'`` (eq. 16): ``-sum_d softmin_d(Var / temperature) Var[u_d]``; ``temperature``
      defaults to 1/D (the paper's alpha is 1/temperature).

    The compiled path computes the column statistics in one fused pass per input and its backward in one
    more; the head on the [B, D] variances is ordinary PyTorch.
    """
    fn = "variance_penalty"
    check_reduction(reduction, fn)
    eps = check_positive(eps, "eps", fn)
    if kind not in VARIANCE_KINDS:
        raise ValueError(f"{fn}: kind must be one of {VARIANCE_KINDS}, got {kind!r}")
    if temperature is not None:
        temperature = check_positive(temperature, "temperature", fn)
    x = as_rows(grads, sample_dim, fn)
    be = resolve_backend(backend, x, fn)
    if be == "torch":
        var = reference.column_variance(x, eps)
    else:
        _, _, var = rows_ops.column_stats(x, eps, ns=NAMESPACES[be])
    return reduce(reference.variance_head(var, kind, temperature), reduction)


#: Names accepted by :func:`diversity_loss`, with the function each one calls.
DIVERSITY_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "dpp": dpp_loss,
    "mean": mean_cosine_loss,
    "kappa": kappa_loss,
    "max": max_cosine_loss,
    "smoothmax": smoothmax_cosine_loss,
    "gal": gal_loss,
    "d3-mean": mean_penalty,
    "d3-var": variance_penalty,
    "d3-sparse": sparsity_penalty,
}


def diversity_loss(name: str, grads: torch.Tensor, **kwargs) -> torch.Tensor:
    """Dispatches to a regularizer by name: 'dpp', 'mean', 'kappa', 'max', 'smoothmax', 'gal',
    'd3-mean' (Omega_M), 'd3-var' (Omega_V), 'd3-sparse' (Omega_S). ``kwargs`` go to that function."""
    if name not in DIVERSITY_LOSSES:
        raise ValueError(f"diversity_loss: name must be one of {sorted(DIVERSITY_LOSSES)}, got {name!r}")
    return DIVERSITY_LOSSES[name](grads, **kwargs)


def concentration_stats(grads: torch.Tensor, *, q: float = 1.0, jitter: float = JITTER, rho_max: float = RHO_MAX,
                        sample_dim: int = 1, eps: float = EPS, backend: str = "auto") -> ConcentrationStats:
    """Concentration statistics of the n gradients at each input, without autograd.

    Returns a :class:`ConcentrationStats` of ``[B]`` tensors: ``rho`` (mean resultant length),
    ``rho_q`` (the l_q-MRL ``||mean_i u_i||_q``; q = 1 by default, the dual of the l_inf attack norm in
    GradDiv's Theorem 1; ``q=math.inf`` allowed), ``kappa`` (kappa_hat with p = D, rho clamped at
    ``rho_max``), ``mean_cos``, ``coherence`` (max cosine) and ``dpp`` (``-log det(C + jitter I)``).
    The compiled path reads each input's gradients from memory once.
    """
    fn = "concentration_stats"
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not (q >= 1):
        raise ValueError(f"{fn}: q must be a number >= 1 (math.inf allowed), got {q!r}")
    jitter = check_positive(jitter, "jitter", fn)
    rho_max = check_open_unit(rho_max, "rho_max", fn)
    eps = check_positive(eps, "eps", fn)
    x = as_rows(grads, sample_dim, fn)
    be = resolve_backend(backend, x, fn)
    if be == "torch":
        with torch.no_grad():
            return reference.concentration_stats(x, float(q), jitter, rho_max, eps)
    out = gram_ops.concentration_stats(x, q=float(q), eps=eps, jitter=jitter, rho_max=rho_max,
                                          ns=NAMESPACES[be])
    return ConcentrationStats(*out.unbind(dim=1))


