"""The n x n Gram heads, batched over B in float64 torch ops; a line-by-line mirror of
fastdiv/csrc/head_math.h (same norm floor, same kRhoFloor, same W -> Ŝ chain rule, same NaN rule).

They run after the Gram kernel for n > 32 samples (fastdiv/triton/gram.py). For n <= 32 the fused
kernel (fastdiv/triton/fused.py) runs the same heads as @triton.jit code on [BLOCK_N, BLOCK_N] register
tiles. That copy cannot take every n: its tiles grow with n (at BLOCK_N = 128 the R_DPP variant already
spills, 255 registers and ~900 bytes of stack a thread for sm_90), and for n > 32 it would replace the
Cholesky of cholesky_ex by R_DPP's sweep, changing the rounding; torch ops cannot run inside a kernel. So
the backend keeps both, and the Triton tests check each against the C++ ops.

They cost O(n^3) per input against O(n^2 D) for the Gram kernel, and float64 keeps log det and
1 - rho^2 accurate. Every function takes and returns float64 tensors. HEADS, RHO_FLOOR and parse_head
serve both copies.
"""
from __future__ import annotations

import math

import torch

HEADS = ("dpp", "mean", "kappa", "max", "smoothmax", "gal", "mean_penalty", "sparsity")
#: Below this mean resultant length R_kappa has zero gradient (head_math.h kRhoFloor).
RHO_FLOOR = 1e-10


def parse_head(name: str) -> str:
    if name not in HEADS:
        raise ValueError(f"fastdiv: head must be one of {', '.join(HEADS)}; got '{name}'")
    return name


def needs_resultant(head: str) -> bool:
    return head in ("kappa", "mean_penalty")


def inverse_norms(s: torch.Tensor, eps: float, scale: torch.Tensor | None = None) -> torch.Tensor:
    """1 / ||y_i|| from the Gram's diagonal [B, n] of the rows y_i = scale_i x_i (scale [B, n]; None: 1); 0
    where ||x_i|| = ||y_i|| / scale_i is at or below the norm floor; NaN stays NaN."""
    sq = torch.diagonal(s, dim1=-2, dim2=-1)
    norm = sq.clamp_min(0).sqrt()
    floor = eps if scale is None else eps * scale
    return torch.where(torch.isnan(sq), sq, torch.where(norm > floor, 1.0 / norm, torch.zeros_like(norm)))


def _cosines(s: torch.Tensor, inv_r: torch.Tensor) -> torch.Tensor:
    return s * inv_r[:, :, None] * inv_r[:, None, :]


def _off_diagonal(n: int, device) -> torch.Tensor:
    return ~torch.eye(n, dtype=torch.bool, device=device)


def _dpp(c: torch.Tensor, jitter: float, with_w: bool):
    """-log det(C + jitter I) by Cholesky (NaN where a pivot is not > 0) and W = -(C + jitter I)^-1."""
    n = c.shape[-1]
    eye = torch.eye(n, dtype=c.dtype, device=c.device)
    m = c + jitter * eye
    ok = ~torch.isnan(m).flatten(1).any(-1)
    m = torch.where(ok[:, None, None], m, eye)  # keep LAPACK away from NaN
    chol, info = torch.linalg.cholesky_ex(m)
    diag = torch.diagonal(chol, dim1=-2, dim2=-1)
    ok = ok & (info == 0) & (diag > 0).all(-1)
    logdet = 2 * torch.log(diag).sum(-1)
    loss = torch.where(ok, -logdet, torch.full_like(logdet, math.nan))
    if not with_w:
        return loss, None
    chol = torch.where(ok[:, None, None], chol, eye)
    return loss, -torch.cholesky_inverse(chol)


def _max_cos(c: torch.Tensor):
    """max_{i<j} C_ij (first in row-major order on ties; NaN if any such C_ij is NaN) and its index."""
    n = c.shape[-1]
    upper = torch.ones(n, n, dtype=torch.bool, device=c.device).triu(1)
    has_nan = (torch.isnan(c) & upper).flatten(1).any(-1)
    flat = c.masked_fill(~upper, -math.inf).flatten(1)
    idx = torch.argmax(torch.nan_to_num(flat, nan=-math.inf), dim=-1)
    val = flat.gather(1, idx[:, None])[:, 0]
    return torch.where(has_nan, torch.full_like(val, math.nan), val), idx


def _mean_cos(c: torch.Tensor):
    n = c.shape[-1]
    w = 1.0 / (n * (n - 1))
    return (c * _off_diagonal(n, c.device)).sum((-2, -1)) * w, w


def _mrl(resultant: torch.Tensor, n: int) -> torch.Tensor:
    return torch.where(torch.isnan(resultant), resultant, resultant.clamp_min(0).sqrt() / n)


def _kappa_of(rho, p):
    return rho * (p - rho) / (1 - rho * rho)


def _clamp_rho(rho: torch.Tensor, rho_max: float) -> torch.Tensor:
    # std::min(rho, rho_max): rho_max only where rho_max < rho, so NaN stays NaN
    return torch.where(rho_max < rho, torch.full_like(rho, rho_max), rho)


def head_forward(head: str, s: torch.Tensor, l1: torch.Tensor | None, resultant: torch.Tensor | None, d: int,
                 eps: float, jitter: float, p: float, rho_max: float, scale: torch.Tensor | None = None):
    """Loss [B], A [B, n, n] and beta [B, n] of a head on the raw float64 Gram s [B, n, n] of the rows scaled
    by ``scale`` [B, n] (None: 1); A is then A'_ij scale_j, as head_math.h writes it."""
    B, n, _ = s.shape
    inv_r = inverse_norms(s, eps, scale)
    c = _cosines(s, inv_r)
    w_mat = torch.zeros_like(s)
    beta = torch.zeros_like(inv_r)
    p = p if p > 0 else float(d)
    off = _off_diagonal(n, s.device)
    if head == "dpp":
        loss, w_mat = _dpp(c, jitter, True)
    elif head == "mean":
        loss, w = _mean_cos(c)
        w_mat = torch.full_like(s, w).masked_fill(~off, 0)
    elif head == "kappa":
        rho = _mrl(resultant, n)
        rc = _clamp_rho(rho, rho_max)
        loss = torch.where(torch.isnan(rho), rho, _kappa_of(rc, p) / p)
        one_m = 1 - rho * rho
        dk_drho = (p * (1 + rho * rho) - 2 * rho) / (one_m * one_m)
        drho_ds = 1.0 / (2.0 * float(n * n) * rho)
        w = torch.where((rho < rho_max) & (rho > RHO_FLOOR), dk_drho / p * drho_ds, torch.zeros_like(rho))
        w_mat = w[:, None, None].expand(B, n, n)
    elif head == "max":
        loss, idx = _max_cos(c)
        w_mat = torch.zeros((B, n * n), dtype=s.dtype, device=s.device)
        w_mat.scatter_(1, idx[:, None], 1.0)
        w_mat = w_mat.view(B, n, n)
    elif head in ("smoothmax", "gal"):
        in_set = off if head == "smoothmax" else torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1)
        cm = c.masked_fill(~in_set, -math.inf)
        m = cm.amax((-2, -1))
        e = torch.exp(cm - m[:, None, None])
        z = e.sum((-2, -1))
        w_mat = e / z[:, None, None]
        loss = m + torch.log(z)
    elif head == "mean_penalty":
        w = 1.0 / float(n * n)
        loss = resultant * w
        w_mat = torch.full_like(s, w)
    elif head == "sparsity":
        loss = -(l1 * inv_r / n).sum(-1)
        beta = -inv_r / n
    else:
        raise ValueError(head)

    # Chain rule dL/dC -> dL/dS (head_math.h): off-diagonal W_ij / (r_i r_j); the diagonal collects
    # -C_ij (W_ij + W_ji) / (2 S_ii) over j != i; rows below the norm floor get nothing.
    diag = -((w_mat + w_mat.transpose(1, 2)) * c).masked_fill(~off, 0).sum(-1)
    diag = diag * (0.5 * inv_r * inv_r)
    if head == "sparsity":
        diag = diag + l1 * inv_r * inv_r * inv_r / (2 * n)
    diag = torch.where(inv_r != 0, diag, torch.zeros_like(diag))
    shat = w_mat * inv_r[:, :, None] * inv_r[:, None, :]
    shat = torch.where(off, shat, torch.diag_embed(diag))
    a = shat + shat.transpose(1, 2)
    if scale is not None:
        a = a * scale[:, None, :]
    bad = torch.isnan(loss)
    a = torch.where(bad[:, None, None], torch.full_like(a, math.nan), a)
    beta = torch.where(bad[:, None], torch.full_like(beta, math.nan), beta)
    return loss, a, beta


def gram_statistics(s: torch.Tensor, resultant: torch.Tensor, m: torch.Tensor, q: float, n: int, d: int,
                    eps: float, jitter: float, rho_max: float, scale: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 6] float64: rho, rho_q (from the column sums m [B, D]), kappa (p = D), mean cosine,
    coherence, dpp; s is the Gram of the rows scaled by ``scale`` (None: 1)."""
    inv_r = inverse_norms(s, eps, scale)
    c = _cosines(s, inv_r)
    rho = _mrl(resultant, n)
    a = (m * (1.0 / n)).abs()
    if a.shape[-1] == 0:
        rho_q = torch.zeros_like(rho)
    elif math.isinf(q):
        rho_q = a.amax(-1)
    else:
        rho_q = (a ** q).sum(-1) ** (1.0 / q)
    rho_q = torch.where(torch.isnan(a).any(-1), torch.full_like(rho_q, math.nan), rho_q)
    kappa = torch.where(torch.isnan(rho), rho, _kappa_of(_clamp_rho(rho, rho_max), float(d)))
    mean, _ = _mean_cos(c)
    coherence, _ = _max_cos(c)
    dpp, _ = _dpp(c, jitter, False)
    return torch.stack([rho, rho_q, kappa, mean, coherence, dpp], dim=-1)
