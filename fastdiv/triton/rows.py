"""Triton kernels on unit rows u_i = x_i / r_i (0 for rows with ||x_i|| <= eps): normalization, its
pullback, and the per-column statistics behind the Diverse-Directions variance penalties, mirroring
fastdiv/csrc/cpu/kernels/rows.cpp. Pullbacks: dL/dx_i = (G_i - <G_i, u_i> u_i) / r_i above the floor, 0 at or below.

The row-norm floor test runs in float64 on the accumulated sum of squares (as the CPU kernels do);
eps is passed as a float64 tensor because Triton would round a Python float argument to fp32. A row whose
sum of squares is out of range (fastdiv/csrc/head_math.h, "Row scaling") is read again for its maximum
and its norm taken from y = s x in float64, s a power of two; u is then computed from y.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops.schemas import acc_dtype
from ._common import acc_tl, block_d, row_scale, scale_exponents, square_out_of_range, tile_blocks


def _eps_tensor(eps: float, device) -> torch.Tensor:
    return torch.tensor([eps], dtype=torch.float64, device=device)


@triton.jit
def _inv_norm(sumsq, eps_ptr):
    # (||x||, 1/||x|| above the floor else 0, NaN kept) in float64, from a sum of squares.
    norm = tl.sqrt(sumsq.to(tl.float64))
    eps = tl.load(eps_ptr)
    inv_r = tl.where(norm != norm, norm, tl.where(norm > eps, 1.0 / norm, 0.0))  # noqa: PLR0124 (NaN test)
    return norm, inv_r


@triton.jit
def _scaled_row(src, gsrc, d, eps_ptr, WITH_G: tl.constexpr, SAFE: tl.constexpr, LIMIT: tl.constexpr,
                BLOCK_D: tl.constexpr):
    # The rare path of a row whose squares leave the accumulation range: its scale s (from its largest
    # |x|), ||x|| = ||y|| / s, 1 / ||y|| above the floor (||y|| > eps s) else 0, and with WITH_G <G, y>, all
    # float64 (every (s x)^2 is at most 16).
    cols = tl.arange(0, BLOCK_D)
    mx = tl.zeros((BLOCK_D,), dtype=tl.float64)
    for d0 in range(0, d, BLOCK_D):
        v = tl.load(src + d0 + cols, mask=d0 + cols < d, other=0).to(tl.float64)
        mx = tl.maximum(mx, tl.abs(v))
    sc = row_scale(tl.max(mx, axis=0), LIMIT)
    ss = tl.zeros((BLOCK_D,), dtype=tl.float64)
    gy = tl.zeros((BLOCK_D,), dtype=tl.float64)
    for d0 in range(0, d, BLOCK_D):
        ok = d0 + cols < d
        y = tl.load(src + d0 + cols, mask=ok, other=0).to(tl.float64) * sc
        ss += y * y
        if WITH_G:
            gy += tl.load(gsrc + d0 + cols, mask=ok, other=0).to(tl.float64) * y
    norm_y = tl.sqrt(tl.sum(ss, axis=0))
    eps = tl.load(eps_ptr)
    inv_y = tl.where(norm_y != norm_y, norm_y, tl.where(norm_y > eps * sc, 1.0 / norm_y, 0.0))  # noqa: PLR0124
    return sc, norm_y / sc, inv_y, tl.sum(gy, axis=0)


@triton.jit
def _is_inf(v):
    # +-Inf of a float64, from its bits (exponent all ones, mantissa zero)
    bits = v.to(tl.int64, bitcast=True)
    return (((bits >> 52) & 0x7FF) == 0x7FF) & ((bits & 0xFFFFFFFFFFFFF) == 0)


@triton.jit
def _row_sumsq(src, d, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    # sum of squares of one row of d values at src, accumulated in ACC
    cols = tl.arange(0, BLOCK_D)
    ss = tl.zeros((BLOCK_D,), dtype=ACC)
    for d0 in range(0, d, BLOCK_D):
        v = tl.load(src + d0 + cols, mask=d0 + cols < d, other=0).to(ACC)
        ss += v * v
    return tl.sum(ss, axis=0)


@triton.jit
def _normalize_kernel(x_ptr, u_ptr, eps_ptr, n, d, stride_b, stride_n,
                      ACC: tl.constexpr, BLOCK_D: tl.constexpr, SAFE: tl.constexpr, LIMIT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    src = x_ptr + (row // n) * stride_b + (row % n) * stride_n
    dst = u_ptr + row * d
    cols = tl.arange(0, BLOCK_D)
    sumsq = _row_sumsq(src, d, BLOCK_D, ACC).to(tl.float64)
    _, inv_r64 = _inv_norm(sumsq, eps_ptr)
    sc = tl.full((), 1.0, tl.float64)
    if square_out_of_range(sumsq, tl.full((), 0.0, tl.float64) + d, SAFE):
        sc, _, inv_r64, _ = _scaled_row(src, src, d, eps_ptr, False, SAFE, LIMIT, BLOCK_D)
    inv_r = inv_r64.to(ACC)
    sc_a = sc.to(ACC)
    for d0 in range(0, d, BLOCK_D):
        ok = d0 + cols < d
        v = tl.load(src + d0 + cols, mask=ok, other=0).to(ACC)
        # (s x) / ||s x||: 1 / ||x|| itself may not be representable; s = 1 leaves the bits unchanged
        tl.store(dst + d0 + cols, ((v * sc_a) * inv_r).to(u_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _normalize_pullback_kernel(x_ptr, g_ptr, dx_ptr, eps_ptr, n, d, stride_b, stride_n, g_stride_b, g_stride_n,
                               ACC: tl.constexpr, BLOCK_D: tl.constexpr, SAFE: tl.constexpr, LIMIT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // n
    i = row % n
    src = x_ptr + b * stride_b + i * stride_n
    gsrc = g_ptr + b * g_stride_b + i * g_stride_n
    dst = dx_ptr + row * d
    cols = tl.arange(0, BLOCK_D)
    ss = tl.zeros((BLOCK_D,), dtype=ACC)
    gx = tl.zeros((BLOCK_D,), dtype=ACC)
    for d0 in range(0, d, BLOCK_D):
        ok = d0 + cols < d
        v = tl.load(src + d0 + cols, mask=ok, other=0).to(ACC)
        g = tl.load(gsrc + d0 + cols, mask=ok, other=0).to(ACC)
        ss += v * v
        gx += g * v
    sumsq = tl.sum(ss, axis=0).to(tl.float64)
    gx64 = tl.sum(gx, axis=0).to(tl.float64)
    _, inv_r64 = _inv_norm(sumsq, eps_ptr)
    sc = tl.full((), 1.0, tl.float64)
    # the rare path also when <G, x> overflowed (finite G and x; NaN stays NaN either way)
    if square_out_of_range(sumsq, tl.full((), 0.0, tl.float64) + d, SAFE) | _is_inf(gx64):
        sc, _, inv_r64, gx64 = _scaled_row(src, gsrc, d, eps_ptr, True, SAFE, LIMIT, BLOCK_D)
    inv_r = inv_r64.to(ACC)
    sc_a = sc.to(ACC)
    # <G, u> u / r = <G, x> x / r^3; with y = s x: (<G, y> y / ||y||^2) / ||y||, times s last (s / ||y|| may
    # not be representable). s = 1 leaves the bits unchanged.
    proj = (gx64 * inv_r64 * inv_r64).to(ACC)
    for d0 in range(0, d, BLOCK_D):
        ok = d0 + cols < d
        v = tl.load(src + d0 + cols, mask=ok, other=0).to(ACC)
        g = tl.load(gsrc + d0 + cols, mask=ok, other=0).to(ACC)
        out = ((g - proj * (v * sc_a)) * inv_r) * sc_a
        tl.store(dst + d0 + cols, out.to(dx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _row_norm_kernel(x_ptr, r_ptr, inv_r_ptr, sc_ptr, eps_ptr, n, d, stride_b, stride_n, BLOCK_D: tl.constexpr,
                     SAFE: tl.constexpr, LIMIT: tl.constexpr):
    # r = ||x_i||, the row's scale s (1 unless out of range) and the acc-dtype 1 / ||s x_i|| (0 below the
    # floor) of one row.
    acc_t = r_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    src = x_ptr + (row // n) * stride_b + (row % n) * stride_n
    sumsq = _row_sumsq(src, d, BLOCK_D, acc_t).to(tl.float64)
    norm, inv_r = _inv_norm(sumsq, eps_ptr)
    sc = tl.full((), 1.0, tl.float64)
    if square_out_of_range(sumsq, tl.full((), 0.0, tl.float64) + d, SAFE):
        sc, norm, inv_r, _ = _scaled_row(src, src, d, eps_ptr, False, SAFE, LIMIT, BLOCK_D)
    tl.store(r_ptr + row, norm.to(acc_t))
    tl.store(inv_r_ptr + row, inv_r.to(acc_t))
    tl.store(sc_ptr + row, sc.to(acc_t))


@triton.jit
def _column_stats_kernel(x_ptr, inv_r_ptr, sc_ptr, mean_ptr, var_ptr, n, d, stride_b, stride_n,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (b, D tile): column mean and two-pass population variance of u over the n rows.
    acc_t = mean_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rows = tl.arange(0, BLOCK_N)
    row_ok = rows < n
    col_ok = cols < d
    mask = row_ok[:, None] & col_ok[None, :]
    tile = tl.load(x_ptr + b * stride_b + rows[:, None].to(tl.int64) * stride_n + cols[None, :],
                   mask=mask, other=0).to(acc_t)
    inv_r = tl.load(inv_r_ptr + b * n + rows, mask=row_ok, other=0)
    sc = tl.load(sc_ptr + b * n + rows, mask=row_ok, other=1)
    inv_n = 1.0 / (tl.full((), 0, acc_t) + n)
    u = (tile * sc[:, None]) * inv_r[:, None]
    m = tl.sum(u, axis=0) * inv_n
    t = tl.where(mask, u - m[None, :], 0)
    v = tl.sum(t * t, axis=0) * inv_n
    tl.store(mean_ptr + b * d + cols, m, mask=col_ok)
    tl.store(var_ptr + b * d + cols, v, mask=col_ok)


@triton.jit
def _column_coefficients(gm_ptr, gv_ptr, mean_ptr, offs, ok, inv_n, HAS_GM: tl.constexpr,
                         HAS_GV: tl.constexpr, BLOCK_D: tl.constexpr):
    # dL/du_id = alpha_d + beta_d u_id for the columns at offs (absent gradients count as zero)
    acc_t = mean_ptr.dtype.element_ty
    alpha = tl.zeros((BLOCK_D,), dtype=acc_t)
    beta = tl.zeros((BLOCK_D,), dtype=acc_t)
    if HAS_GM:
        alpha = tl.load(gm_ptr + offs, mask=ok, other=0) * inv_n
    if HAS_GV:
        beta = 2.0 * tl.load(gv_ptr + offs, mask=ok, other=0) * inv_n
        alpha -= beta * tl.load(mean_ptr + offs, mask=ok, other=0)
    return alpha, beta


@triton.jit
def _column_stats_pullback_kernel(x_ptr, r_ptr, mean_ptr, gr_ptr, gm_ptr, gv_ptr, dx_ptr, eps_ptr,
                                  n, d, stride_b, stride_n,
                                  HAS_GR: tl.constexpr, HAS_GM: tl.constexpr, HAS_GV: tl.constexpr,
                                  BLOCK_D: tl.constexpr, SAFE: tl.constexpr, LIMIT: tl.constexpr):
    # One program per row (b, i). G_id = alpha_d + beta_d u_id with alpha = (g_mean - 2 g_var m) / n
    # and beta = 2 g_var / n; pass 1 reduces c_i = <G_i, u_i>, pass 2 writes
    # dx_i = (G_i - c_i u_i) / r_i + g_r_i u_i. A stored norm out of range (1 / r not a normal number, or
    # r = Inf for a finite row past the dtype's maximum) is taken again from the row, scaled (rows.cpp).
    acc_t = r_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    b = row // n
    src = x_ptr + b * stride_b + (row % n) * stride_n
    dst = dx_ptr + row * d
    cols = tl.arange(0, BLOCK_D)
    inv_n = 1.0 / (tl.full((), 0, acc_t) + n)
    eps = tl.load(eps_ptr).to(acc_t)
    r = tl.load(r_ptr + row)
    inv_r = tl.where(r != r, r, tl.where(r > eps, 1.0 / r, 0.0).to(acc_t))  # noqa: PLR0124 (NaN test)
    gr = 0.0
    if HAS_GR:
        gr = tl.load(gr_ptr + row)
    r64 = r.to(tl.float64)
    if square_out_of_range(r64 * r64, 1.0, SAFE):
        sc64, _, inv_y, _ = _scaled_row(src, src, d, eps_ptr, False, SAFE, LIMIT, BLOCK_D)
        sc = sc64.to(acc_t)
        iy = inv_y.to(acc_t)
        c = tl.zeros((BLOCK_D,), dtype=acc_t)
        for d0 in range(0, d, BLOCK_D):
            ok = d0 + cols < d
            u = (tl.load(src + d0 + cols, mask=ok, other=0).to(acc_t) * sc) * iy
            alpha, beta = _column_coefficients(gm_ptr, gv_ptr, mean_ptr, b * d + d0 + cols, ok, inv_n,
                                               HAS_GM, HAS_GV, BLOCK_D)
            c += (alpha + beta * u) * u
        ci = tl.sum(c, axis=0)
        for d0 in range(0, d, BLOCK_D):  # 1 / r = s / ||y|| applied last
            ok = d0 + cols < d
            u = (tl.load(src + d0 + cols, mask=ok, other=0).to(acc_t) * sc) * iy
            alpha, beta = _column_coefficients(gm_ptr, gv_ptr, mean_ptr, b * d + d0 + cols, ok, inv_n,
                                               HAS_GM, HAS_GV, BLOCK_D)
            out = ((alpha + beta * u - ci * u) * iy) * sc + gr * u
            tl.store(dst + d0 + cols, out.to(dx_ptr.dtype.element_ty), mask=ok)
    else:
        c = tl.zeros((BLOCK_D,), dtype=acc_t)
        for d0 in range(0, d, BLOCK_D):
            ok = d0 + cols < d
            xv = tl.load(src + d0 + cols, mask=ok, other=0).to(acc_t)
            alpha, beta = _column_coefficients(gm_ptr, gv_ptr, mean_ptr, b * d + d0 + cols, ok, inv_n,
                                               HAS_GM, HAS_GV, BLOCK_D)
            c += (alpha + beta * xv * inv_r) * xv
        cu = tl.sum(c, axis=0) * inv_r * inv_r
        x_coef = (gr - cu) * inv_r
        for d0 in range(0, d, BLOCK_D):
            ok = d0 + cols < d
            xv = tl.load(src + d0 + cols, mask=ok, other=0).to(acc_t)
            alpha, beta = _column_coefficients(gm_ptr, gv_ptr, mean_ptr, b * d + d0 + cols, ok, inv_n,
                                               HAS_GM, HAS_GV, BLOCK_D)
            out = (alpha + beta * xv * inv_r) * inv_r + x_coef * xv
            tl.store(dst + d0 + cols, out.to(dx_ptr.dtype.element_ty), mask=ok)


def normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """u = x / ||x|| per row (0 at or below the norm floor); x.dtype, contiguous."""
    B, n, d = x.shape
    u = torch.empty((B, n, d), dtype=x.dtype, device=x.device)
    if u.numel() == 0:
        return u
    safe, limit = scale_exponents(x.dtype)
    _normalize_kernel[(B * n,)](x, u, _eps_tensor(eps, x.device), n, d, x.stride(0), x.stride(1),
                                ACC=acc_tl(x.dtype), BLOCK_D=block_d(d), SAFE=safe, LIMIT=limit)
    return u


def normalize_pullback(x: torch.Tensor, grad: torch.Tensor, eps: float) -> torch.Tensor:
    B, n, d = x.shape
    dx = torch.empty((B, n, d), dtype=x.dtype, device=x.device)
    if dx.numel() == 0:
        return dx
    if d > 1 and grad.stride(2) != 1:
        grad = grad.contiguous()
    safe, limit = scale_exponents(x.dtype)
    _normalize_pullback_kernel[(B * n,)](x, grad, dx, _eps_tensor(eps, x.device), n, d, x.stride(0), x.stride(1),
                                         grad.stride(0), grad.stride(1), ACC=acc_tl(x.dtype),
                                         BLOCK_D=block_d(d), SAFE=safe, LIMIT=limit)
    return dx


def column_stats(x: torch.Tensor, eps: float):
    """Row norms r [B, n], column means and population variances of u [B, D] (acc dtype)."""
    B, n, d = x.shape
    acc = acc_dtype(x.dtype)
    r = torch.empty((B, n), dtype=acc, device=x.device)
    mean = torch.empty((B, d), dtype=acc, device=x.device)
    var = torch.empty((B, d), dtype=acc, device=x.device)
    if B == 0 or n == 0:
        mean.fill_(float("nan") if n == 0 else 0)
        var.fill_(float("nan") if n == 0 else 0)
        return r, mean, var
    inv_r = torch.empty((B, n), dtype=acc, device=x.device)
    scale = torch.empty((B, n), dtype=acc, device=x.device)
    safe, limit = scale_exponents(x.dtype)
    _row_norm_kernel[(B * n,)](x, r, inv_r, scale, _eps_tensor(eps, x.device), n, d, x.stride(0), x.stride(1),
                               BLOCK_D=block_d(d), SAFE=safe, LIMIT=limit)
    if d == 0:
        return r, mean, var
    block_n, tile_d = tile_blocks(n, d)
    _column_stats_kernel[(B, triton.cdiv(d, tile_d))](x, inv_r, scale, mean, var, n, d, x.stride(0), x.stride(1),
                                                      BLOCK_N=block_n, BLOCK_D=tile_d)
    return r, mean, var


def column_stats_pullback(x: torch.Tensor, r: torch.Tensor, mean: torch.Tensor, grad_r, grad_mean, grad_var,
                          eps: float) -> torch.Tensor:
    B, n, d = x.shape
    dx = torch.empty((B, n, d), dtype=x.dtype, device=x.device)
    if dx.numel() == 0:
        return dx
    r = r.contiguous()
    mean = mean.contiguous()
    gr = grad_r.contiguous() if grad_r is not None else None
    gm = grad_mean.contiguous() if grad_mean is not None else None
    gv = grad_var.contiguous() if grad_var is not None else None
    _column_stats_pullback_kernel[(B * n,)](
        x, r, mean, gr if gr is not None else r, gm if gm is not None else mean, gv if gv is not None else mean,
        dx, _eps_tensor(eps, x.device), n, d, x.stride(0), x.stride(1),
        HAS_GR=gr is not None, HAS_GM=gm is not None, HAS_GV=gv is not None, BLOCK_D=block_d(d),
        SAFE=scale_exponents(x.dtype)[0], LIMIT=scale_exponents(x.dtype)[1])
    return dx
