"""Triton kernels of the Gram family: the raw Gram S = X X^T (+ row l1 norms), the column resultant
||sum_i u_i||^2 behind R_kappa / Omega_M / the MRL statistics, and the pullback
dX = scale (A X + beta ⊙ sign(X)).

x is [B, n, D] with unit stride on D and any strides on B and n (the strides go to the kernels, no
copy). Accumulation is in the "acc" dtype (fp32, fp64 for fp64 inputs), taken from the output pointer.
Every output element is written by exactly one program: no atomics, results are deterministic.
For n <= 32, gram_loss and concentration_stats are one launch of the fused kernel (fastdiv/triton/fused.py:
the Gram, the resultant and the n x n head in float64 in the epilogue); beyond that the heads run after
the Gram kernel in float64 torch ops (fastdiv/triton/heads.py). That path takes the row scales
(fastdiv/csrc/head_math.h, "Row scaling") from the rows' maxima first (fastdiv.reference.row_scale: one
more read of X) and hands them to the Gram kernel, which scales the rows as it loads them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ..ops.schemas import acc_dtype
from . import fused
from ._common import load_tile, tile_blocks, tile_gram, tile_gram_scaled
from .heads import gram_statistics, head_forward, inverse_norms, parse_head


@triton.jit
def _gram_kernel(x_ptr, s_ptr, l1_ptr, scale_ptr, n, d, stride_b, stride_n,
                 WITH_L1: tl.constexpr, SCALED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per input b: S_b = X_b X_b^T accumulated over D tiles in [BLOCK_N, BLOCK_N] registers;
    # with SCALED, of the rows y_i = scale_i x_i (scale_ptr [B, n], acc).
    acc_t = s_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n
    base = x_ptr + b * stride_b
    if SCALED:
        scale = tl.load(scale_ptr + b * n + rows, mask=row_ok, other=1.0)
    s = tl.zeros((BLOCK_N, BLOCK_N), dtype=acc_t)
    l1 = tl.zeros((BLOCK_N,), dtype=acc_t)
    for d0 in range(0, d, BLOCK_D):
        col_ok = (d0 + cols) < d
        tile = load_tile(base, rows, row_ok, d0, cols, col_ok, stride_n, acc_t)
        if SCALED:
            tile = tile * scale[:, None]
        if WITH_L1:
            l1 += tl.sum(tl.abs(tile), axis=1)
        if SCALED:
            s += tile_gram_scaled(tile, base, rows, d0, cols, col_ok, n, stride_n, scale, BLOCK_N)
        else:
            s += tile_gram(tile, base, rows, d0, cols, col_ok, n, stride_n, BLOCK_N)
    out = s_ptr + b * n * n + rows[:, None] * n + rows[None, :]
    tl.store(out, s, mask=row_ok[:, None] & row_ok[None, :])
    if WITH_L1:
        tl.store(l1_ptr + b * n + rows, l1, mask=row_ok)


@triton.jit
def _resultant_kernel(x_ptr, inv_r_ptr, sq_ptr, m_ptr, n, d, stride_b, stride_n,
                      STORE_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per input b: column sums m = sum_i x_i / r_i over D tiles, in float64 whatever the
    # input dtype (as the CPU kernel): where the rows cancel, rho ~ 1e-8 of fp32 rounding would pass
    # R_kappa's rho floor (1e-10) and blow up its gradient. Writes ||m||^2 [B] and, when STORE_M, m
    # itself ([B, D] float64, for the l_q mean resultant length).
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n
    base = x_ptr + b * stride_b
    inv_r = tl.load(inv_r_ptr + b * n + rows, mask=row_ok, other=0)
    sq = tl.zeros((BLOCK_D,), dtype=tl.float64)
    for d0 in range(0, d, BLOCK_D):
        col_ok = (d0 + cols) < d
        tile = load_tile(base, rows, row_ok, d0, cols, col_ok, stride_n, tl.float64)
        m = tl.sum(tile * inv_r[:, None], axis=0)
        sq += m * m
        if STORE_M:
            tl.store(m_ptr + b * d + d0 + cols, m, mask=col_ok)
    tl.store(sq_ptr + b, tl.sum(sq, axis=0))


@triton.jit
def _pullback_kernel(x_ptr, a_ptr, beta_ptr, scale_ptr, rs_ptr, dx_ptr, n, d, stride_b, stride_n, scale_stride,
                     HAS_BETA: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (b, D tile): dX_tile = s_b (A_b X_tile + beta_b ⊙ sign(X_tile)), as a sum of n
    # rank-one updates (column j of A times row j of the tile). The scale s_b (scale_ptr[b * scale_stride],
    # any stride) multiplies the coefficients as they are loaded, not the sum: the result is then the
    # unscaled kernel on the unfused a * s, beta * s, rounding and NaN / Inf scales included. The row
    # scales (rs_ptr [B, n], gram_loss's) multiply the rows of the sum.
    acc_t = a_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    if HAS_SCALE:
        s = tl.load(scale_ptr + b * scale_stride)
    d0 = tl.program_id(1) * BLOCK_D
    rows = tl.arange(0, BLOCK_N)
    cols = d0 + tl.arange(0, BLOCK_D)
    row_ok = rows < n
    col_ok = cols < d
    mask = row_ok[:, None] & col_ok[None, :]
    base = x_ptr + b * stride_b
    out = tl.zeros((BLOCK_N, BLOCK_D), dtype=acc_t)
    if HAS_BETA:
        tile = load_tile(base, rows, row_ok, 0, cols, col_ok, stride_n, acc_t)
        # sign(NaN) = 0, as (v > 0) - (v < 0) in the CPU kernel
        sgn = tl.where(tile > 0, 1.0, 0.0).to(acc_t) - tl.where(tile < 0, 1.0, 0.0).to(acc_t)
        beta = tl.load(beta_ptr + b * n + rows, mask=row_ok, other=0)
        if HAS_SCALE:
            beta = beta * s
        out += beta[:, None] * sgn
    a_base = a_ptr + b * n * n
    xj_ptr = base + cols  # row j, advanced as a 64-bit pointer (j * stride_n may pass 2^31)
    for j in range(n):
        aj = tl.load(a_base + rows * n + j, mask=row_ok, other=0)
        if HAS_SCALE:
            aj = aj * s
        xj = tl.load(xj_ptr, mask=col_ok, other=0).to(acc_t)
        out += aj[:, None] * xj[None, :]
        xj_ptr += stride_n
    if HAS_ROW_SCALE:
        out = out * tl.load(rs_ptr + b * n + rows, mask=row_ok, other=1)[:, None]
    dst = dx_ptr + b * n * d + rows[:, None].to(tl.int64) * d + cols[None, :]
    tl.store(dst, out.to(dx_ptr.dtype.element_ty), mask=mask)


def gram(x: torch.Tensor, with_l1: bool, scale: torch.Tensor | None = None):
    """Raw Gram S [B, n, n] and row l1 norms [B, n] (or [B, 0]), both in the acc dtype; with ``scale``
    ([B, n] acc), those of the rows scale_i x_i."""
    B, n, d = x.shape
    acc = acc_dtype(x.dtype)
    s = torch.empty((B, n, n), dtype=acc, device=x.device)
    l1 = torch.empty((B, n if with_l1 else 0), dtype=acc, device=x.device)
    if B == 0 or n == 0:
        return s, l1
    if d == 0:
        s.zero_()
        l1.zero_()
        return s, l1
    block_n, block_d = tile_blocks(n, d)
    scaled = scale is not None
    _gram_kernel[(B,)](x, s, l1 if with_l1 else s, scale.contiguous() if scaled else s, n, d, x.stride(0),
                       x.stride(1), WITH_L1=bool(with_l1), SCALED=scaled, BLOCK_N=block_n, BLOCK_D=block_d)
    return s, l1


def _row_scales(x: torch.Tensor) -> torch.Tensor:
    """The row scales [B, n] (acc) of the two-launch path, from the rows' maxima: those of the fused kernels
    (fastdiv.reference.row_scale per input)."""
    acc = acc_dtype(x.dtype)
    return reference.row_scale(x.to(acc) if x.dtype != acc else x, per_input=True)[..., 0]


def _resultant(x: torch.Tensor, inv_r: torch.Tensor, store_m: bool):
    """||sum_i x_i inv_r_i||^2 per input [B] and, when store_m, the column sums [B, D] (float64;
    inv_r is the float64 [B, n] of heads.inverse_norms)."""
    B, n, d = x.shape
    sq = torch.empty((B,), dtype=torch.float64, device=x.device)
    m = torch.empty((B, d if store_m else 0), dtype=torch.float64, device=x.device)
    if B == 0:
        return sq, m
    if d == 0:
        sq.zero_()
        return sq, m
    block_n, block_d = tile_blocks(n, d)
    _resultant_kernel[(B,)](x, inv_r.to(torch.float64).contiguous(), sq, m if store_m else sq, n, d,
                            x.stride(0), x.stride(1), STORE_M=bool(store_m),
                            BLOCK_N=block_n, BLOCK_D=block_d)
    return sq, m


def gram_pullback(x: torch.Tensor, a: torch.Tensor, beta: torch.Tensor | None,
                  scale: torch.Tensor | None = None, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """dX_bi = scale_b row_scale_bi (A_b X_b + beta_b ⊙ sign(X_b))_i; x.dtype, contiguous [B, n, D]. scale is
    [B] in the acc dtype with any stride (read in place: an expanded stride-0 gradient is not copied);
    row_scale [B, n] acc (gram_loss's fourth output; None or empty: 1)."""
    B, n, d = x.shape
    dx = torch.empty((B, n, d), dtype=x.dtype, device=x.device)
    if dx.numel() == 0:
        return dx
    a = a.contiguous()
    has_beta = beta is not None and beta.numel() > 0
    beta_arg = beta.contiguous() if has_beta else a
    has_scale = scale is not None
    has_rs = row_scale is not None and row_scale.numel() > 0
    block_n, block_d = tile_blocks(n, d)
    block_d = min(block_d, 256)
    grid = (B, triton.cdiv(d, block_d))
    _pullback_kernel[grid](x, a, beta_arg, scale if has_scale else a, row_scale.contiguous() if has_rs else a, dx,
                           n, d, x.stride(0), x.stride(1), scale.stride(0) if has_scale else 0, HAS_BETA=has_beta,
                           HAS_SCALE=has_scale, HAS_ROW_SCALE=has_rs, BLOCK_N=block_n, BLOCK_D=block_d)
    return dx


def gram_loss(x: torch.Tensor, head: str, eps: float, jitter: float, p: float, rho_max: float):
    """Per-input loss [B], pullback coefficients A [B, n, n], beta [B, n] ([B, 0] unless sparsity) and the
    row scales [B, n].

    n <= 32: one launch of the fused kernel (fastdiv/triton/fused.py: Gram, resultant and head in one
    program per input). Larger n: the Gram kernel (+ the resultant kernel for kappa / mean_penalty),
    then the head in float64 torch ops (fastdiv/triton/heads.py)."""
    h = parse_head(head)
    B, n, d = x.shape
    if fused.can_fuse(n):
        return fused.gram_loss(x, h, eps, jitter, p, rho_max)
    acc = acc_dtype(x.dtype)
    if B == 0:
        return (torch.empty((0,), dtype=acc, device=x.device), torch.empty((0, n, n), dtype=acc, device=x.device),
                torch.empty((0, n if h == "sparsity" else 0), dtype=acc, device=x.device),
                torch.empty((0, n), dtype=acc, device=x.device))
    row_scale = _row_scales(x)
    s, l1 = gram(x, h == "sparsity", row_scale)
    s64, scale64 = s.double(), row_scale.double()
    resultant = None
    if h in ("kappa", "mean_penalty"):
        sq, _ = _resultant(x, inverse_norms(s64, eps, scale64) * scale64, False)
        resultant = sq.double()
    loss, A, beta = head_forward(h, s64, l1.double(), resultant, d, eps, jitter, p, rho_max, scale64)
    if h != "sparsity":
        beta = beta[:, :0]
    return loss.to(acc), A.to(acc).contiguous(), beta.to(acc).contiguous(), row_scale.contiguous()


def concentration_stats(x: torch.Tensor, q: float, eps: float, jitter: float, rho_max: float) -> torch.Tensor:
    """[B, 6] acc: rho, rho_q, kappa, mean cosine, coherence, dpp. n <= 32: one fused launch; larger n:
    the Gram and resultant kernels, then float64 torch ops."""
    B, n, d = x.shape
    if fused.can_fuse(n):
        return fused.concentration_stats(x, q, eps, jitter, rho_max)
    acc = acc_dtype(x.dtype)
    if B == 0:
        return torch.empty((0, 6), dtype=acc, device=x.device)
    row_scale = _row_scales(x)
    s, _ = gram(x, False, row_scale)
    s64, scale64 = s.double(), row_scale.double()
    sq, m = _resultant(x, inverse_norms(s64, eps, scale64) * scale64, True)
    return gram_statistics(s64, sq.double(), m.double(), q, n, d, eps, jitter, rho_max,
                           scale64).to(acc).contiguous()
