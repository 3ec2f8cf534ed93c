"""The fused forward of the Gram-family losses and of the concentration statistics: one Triton launch
per call for n <= 32 samples (MAX_FUSED_N), one program per input b.

Each program reads X_b in D tiles and accumulates the raw Gram S (and the row l1 norms for Omega_S);
when the head needs the resultant (R_kappa, Omega_M, the statistics) it reads the same rows a second
time for the column sums m = sum_i x_i / r_i in float64; then it runs the n x n head in float64 on
[BLOCK_N, BLOCK_N] register tiles and writes loss [B], A [B, n, n], beta [B, n] (or the [B, 6] row
of statistics). The head math is fastdiv/csrc/head_math.h, statement for statement where the order of
operations matters (norm floor, kRhoFloor, the rho clamp, the W -> Ŝ chain rule, the NaN rule); sums
over i, j are tree reductions instead of sequential loops, which changes rounding only.

Rows and columns >= n of the tiles are padding: the Gram and the inverse norms are 0 there, and
every sum, max and the DPP elimination are masked to the n x n block.

Rows whose squares leave the accumulation dtype's range (|x| ~ 1e19 overflows fp32, ~1e-23 flushes to 0;
fastdiv/csrc/head_math.h, "Row scaling"): when a diagonal entry of the Gram is out of range, the program
reads the rows once more for their maxima and, if a row needs it, accumulates the Gram again in float64
from the rows scaled by powers of two. Its head then sees the scaled Gram, and the loss's outputs are the
coefficients A'_ij s_j and the row scales s_i the pullback multiplies its rows by.

R_DPP factors M = C + jitter I by Gauss-Jordan elimination without pivoting (valid for symmetric
positive definite M), in its symmetric form (the sweep operator, see _dpp): the pivots are the squares
of the Cholesky factor's diagonal, so log det M is the sum of their logs, a pivot that is not > 0 (or
NaN) gives a NaN loss as the C++ Cholesky does, and the swept tile is -M^{-1} = W = dL/dC.

Larger n keep the two-launch path of fastdiv/triton/gram.py (Gram kernel, resultant kernel, float64
torch heads).
"""
from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

from ..ops.schemas import acc_dtype
from ._common import (
    load_tile,
    needs_scale,
    row_scale,
    scale_exponents,
    square_out_of_range,
    tile_blocks,
    tile_gram,
    tile_gram_scaled,
)
from .heads import HEADS, RHO_FLOOR, parse_head

#: Largest n the fused kernel handles: its [BLOCK_N, BLOCK_N] float64 head tiles stay in registers.
MAX_FUSED_N = 32
#: Elements of the fused kernel's [BLOCK_N, BLOCK_D] tile of X (see _blocks).
FUSED_TILE_ELEMS = 2048

# Head codes of the kernel (its HEAD constexpr, one compiled variant per head), in the order of
# heads.HEADS; STATS is concentration_stats. Kernels read globals only as tl.constexpr.
_HEAD_CODE = {name: code for code, name in enumerate(HEADS)}
DPP, MEAN, KAPPA, MAX, SMOOTHMAX, GAL, MEAN_PENALTY, SPARSITY = (tl.constexpr(_HEAD_CODE[h]) for h in HEADS)
STATS = tl.constexpr(len(HEADS))

# NaN as its bit pattern: a NaN constexpr global would fail Triton's check that a global has one
# value across the kernels that read it (NaN != NaN).
_NAN_BITS = tl.constexpr(0x7FF8000000000000)
_NEG_INF = tl.constexpr(-math.inf)
_RHO_FLOOR = tl.constexpr(RHO_FLOOR)


def can_fuse(n: int) -> bool:
    """True when one launch of the fused kernel computes the whole forward."""
    return n <= MAX_FUSED_N


def _f64_bits(v: float) -> int:
    """The IEEE bit pattern of a double as a signed 64-bit int: Triton types a Python float argument
    as fp32 (and the interpreter rounds it to fp32), and a float64 tensor of parameters would cost a
    host-to-device copy that synchronizes the stream. The kernel bitcasts it back (_f64)."""
    return struct.unpack("<q", struct.pack("<d", float(v)))[0]


@triton.jit
def _f64(bits):
    # i32 (small patterns, e.g. 0.0), u32 or i64 argument -> the double it encodes
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _nan():
    return tl.full((), _NAN_BITS, tl.int64).to(tl.float64, bitcast=True)


@triton.jit
def _inverse_norms(sq, eps, scale):
    # 1 / ||y_i|| from S_ii of the rows y_i = scale_i x_i; 0 where ||x_i|| = ||y_i|| / scale_i is at or below
    # the norm floor (and in padding, S_ii = 0); NaN stays NaN
    norm = tl.sqrt(tl.where(sq < 0, 0.0, sq))  # max_of(sq, 0): NaN passes through
    above = norm > eps * scale
    return tl.where(sq != sq, sq, tl.where(above, 1.0 / tl.where(above, norm, 1.0), 0.0))  # noqa: PLR0124


@triton.jit
def _mrl(resultant, nf):
    # rho_hat = sqrt(||sum_i u_i||^2) / n; NaN stays NaN
    return tl.where(resultant != resultant, resultant,  # noqa: PLR0124
                    tl.sqrt(tl.where(resultant < 0, 0.0, resultant)) / nf)


@triton.jit
def _kappa_of(rho, p):
    return rho * (p - rho) / (1 - rho * rho)


@triton.jit
def _clamp_rho(rho, rho_max):
    # std::min(rho, rho_max): rho_max only where rho_max < rho, so NaN stays NaN
    return tl.where(rho_max < rho, rho_max, rho)


@triton.jit
def _mean_cos(c, off, nf):
    w = 1.0 / (nf * (nf - 1.0))
    return tl.sum(tl.where(off, c, 0.0)) * w, w


@triton.jit
def _max_cos(c, upper, flat, BLOCK_N: tl.constexpr):
    # max_{i<j} C_ij and the one-hot W of the first maximal pair in row-major order (the C++ loop keeps
    # the first one on ties: it moves only on a strictly larger value); NaN if any C_ij (i < j) is NaN
    has_nan = tl.sum(tl.where(upper & (c != c), 1, 0)) > 0  # noqa: PLR0124
    cu = tl.where(upper & (c == c), c, _NEG_INF)  # noqa: PLR0124
    best = tl.max(cu)
    first = tl.min(tl.where(upper & (cu == best), flat, BLOCK_N * BLOCK_N))
    return tl.where(has_nan, _nan(), best), tl.where(flat == first, 1.0, 0.0).to(tl.float64)


@triton.jit
def _dpp(c, jitter, valid, is_diag, row_ok, rows, n):
    # -log det M and W = -M^{-1} for M = C + jitter I, by sweeping the pivots k = 0..n-1 of the tile
    # (Gauss-Jordan elimination without pivoting in its symmetric form, the sweep operator):
    #   m_ij -= m_ik m_kj / m_kk (i, j != k),  m_ik, m_ki /= m_kk,  m_kk = -1 / m_kk.
    # The pivots m_kk are the Schur complements of the leading blocks, the squared diagonal of the
    # Cholesky factor, and the fully swept tile is -M^{-1} = W. M is built from the lower triangle of C
    # (the part the C++ Cholesky reads) and every update is symmetric bit for bit, so column k is row k
    # and one reduction extracts both. Padding is the identity and is never swept.
    m = tl.where(valid, c, 0.0) + tl.where(is_diag, tl.where(valid, jitter, 1.0), 0.0)
    m = tl.where(rows[:, None] >= rows[None, :], m, tl.trans(m))
    piv = tl.full(rows.shape, 1.0, tl.float64)
    for k in range(n):
        col_k = tl.sum(tl.where(rows[None, :] == k, m, 0.0), axis=1)  # m[:, k] = m[k, :]
        pivot = tl.sum(tl.where(rows == k, col_k, 0.0), axis=0)
        piv = tl.where(rows == k, pivot, piv)
        # a bad pivot makes the loss NaN below; divide by 1 instead so the rest stays quiet
        inv_p = 1.0 / tl.where(pivot > 0, pivot, 1.0)
        on_row = rows[:, None] == k
        on_col = rows[None, :] == k
        edge = tl.where(on_row, col_k[None, :], col_k[:, None]) * inv_p  # m_kj / m_kk, m_ik / m_kk
        upd = m - (col_k[:, None] * col_k[None, :]) * inv_p
        m = tl.where(on_row & on_col, -inv_p, tl.where(on_row | on_col, edge, upd))
    good = row_ok & (piv > 0)
    ok = tl.sum(tl.where(row_ok & (~good), 1, 0)) == 0
    logdet = tl.sum(tl.log(tl.where(good, piv, 1.0)))
    return tl.where(ok, -logdet, _nan()), tl.where(valid, m, 0.0)


@triton.jit(do_not_specialize=["n", "eps_bits", "jitter_bits", "p_bits", "rho_max_bits", "q_bits"])
def _fused_kernel(x_ptr, out_ptr, a_ptr, beta_ptr, rs_ptr, n, d, stride_b, stride_n,
                  eps_bits, jitter_bits, p_bits, rho_max_bits, q_bits,
                  HEAD: tl.constexpr, Q_INF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  SAFE: tl.constexpr, LIMIT: tl.constexpr):
    # out_ptr: loss [B] (heads) or the statistics [B, 6] (HEAD == STATS); its dtype is the acc dtype.
    # rs_ptr: the row scales [B, n] (heads only). SAFE, LIMIT: the row scaling's exponents (_common.py).
    # p_bits: R_kappa's p (already D when p <= 0), or D for the statistics' kappa.
    acc_t = out_ptr.dtype.element_ty
    eps = _f64(eps_bits)
    jitter = _f64(jitter_bits)
    p = _f64(p_bits)
    rho_max = _f64(rho_max_bits)
    b = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n
    valid = row_ok[:, None] & row_ok[None, :]
    is_diag = rows[:, None] == rows[None, :]
    off = valid & (~is_diag)
    upper = valid & (rows[:, None] < rows[None, :])
    base = x_ptr + b * stride_b
    nf = n.to(tl.float64)

    # ---- the Gram (and l1 norms): one read of X_b, as _gram_kernel. A D tile is summed in the acc
    # dtype, the tiles in float64 (the C++ kernels add each tile's fp32 dot products into double).
    s = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float64)
    l1 = tl.zeros((BLOCK_N,), dtype=tl.float64)
    for d0 in range(0, d, BLOCK_D):
        col_ok = (d0 + cols) < d
        tile = load_tile(base, rows, row_ok, d0, cols, col_ok, stride_n, acc_t)
        if HEAD == SPARSITY:
            # Omega_S reads only the row norms: the diagonal, O(n D) (the C++ diagonal_only Gram)
            l1 += tl.sum(tl.abs(tile), axis=1).to(tl.float64)
            s += tl.where(is_diag, tl.sum(tile * tile, axis=1)[:, None], 0).to(tl.float64)
        else:
            s += tile_gram(tile, base, rows, d0, cols, col_ok, n, stride_n, BLOCK_N).to(tl.float64)
    # S exactly symmetric, from its lower triangle as the C++ gram_one mirrors it
    s = tl.where(rows[:, None] >= rows[None, :], s, tl.trans(s))

    # ---- row scaling (row_scales / scaled_gram of fastdiv/csrc/cpu/kernels/gram.cpp): only when a diagonal entry
    # is suspect, a pass for the rows' maxima, and when a row needs a scale, the Gram again in float64
    scale = tl.full((BLOCK_N,), 1.0, tl.float64)
    df = tl.full((), 0.0, tl.float64) + d  # d as a float64 (d may arrive as a constant)
    suspect = square_out_of_range(tl.sum(tl.where(is_diag, s, 0.0), axis=1), df, SAFE) & row_ok
    if tl.sum(tl.where(suspect, 1, 0), axis=0) > 0:
        mx = tl.zeros((BLOCK_N,), dtype=tl.float64)
        for d0 in range(0, d, BLOCK_D):
            col_ok = (d0 + cols) < d
            tile = load_tile(base, rows, row_ok, d0, cols, col_ok, stride_n, tl.float64)
            mx = tl.maximum(mx, tl.max(tl.abs(tile), axis=1))
        # a row that needs a scale: every row of the input is scaled (head_math.h says why)
        if tl.sum(tl.where(needs_scale(mx, SAFE) & row_ok, 1, 0), axis=0) > 0:
            scale = tl.where(row_ok, row_scale(mx, LIMIT), 1.0)
            s = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float64)
            l1 = tl.zeros((BLOCK_N,), dtype=tl.float64)
            for d0 in range(0, d, BLOCK_D):
                col_ok = (d0 + cols) < d
                tile = load_tile(base, rows, row_ok, d0, cols, col_ok, stride_n, tl.float64) * scale[:, None]
                if HEAD == SPARSITY:
                    l1 += tl.sum(tl.abs(tile), axis=1)
                    s += tl.where(is_diag, tl.sum(tile * tile, axis=1)[:, None], 0.0)
                else:
                    s += tile_gram_scaled(tile, base, rows, d0, cols, col_ok, n, stride_n, scale, BLOCK_N)
            s = tl.where(rows[:, None] >= rows[None, :], s, tl.trans(s))

    inv_r = _inverse_norms(tl.sum(tl.where(is_diag, s, 0.0), axis=1), eps, scale)
    # cosines C_ij = S_ij r_i^-1 r_j^-1 (0 in padding and for rows below the norm floor)
    c = s * inv_r[:, None] * inv_r[None, :]

    # ---- the resultant ||sum_i u_i||^2 from the column sums of u in float64, a second pass over the
    # same rows (as _resultant_kernel; for the statistics also ||m / n||_q)
    resultant = tl.zeros((), dtype=tl.float64)
    rho_q = tl.zeros((), dtype=tl.float64)
    if (HEAD == KAPPA) | (HEAD == MEAN_PENALTY) | (HEAD == STATS):
        sq = tl.zeros((BLOCK_D,), dtype=tl.float64)
        acc_q = tl.zeros((BLOCK_D,), dtype=tl.float64)
        nan_q = tl.zeros((BLOCK_D,), dtype=tl.int32)
        inv_n = 1.0 / nf
        for d0 in range(0, d, BLOCK_D):
            col_ok = (d0 + cols) < d
            tile = load_tile(base, rows, row_ok, d0, cols, col_ok, stride_n, tl.float64)
            m = tl.sum(tile * (inv_r * scale)[:, None], axis=0)  # 1 / ||x_i||; 0 in masked columns
            sq += m * m
            if HEAD == STATS:
                a = tl.abs(m * inv_n)
                nan_q = tl.where(a != a, 1, nan_q)  # noqa: PLR0124
                a = tl.where(a != a, 0.0, a)  # noqa: PLR0124 (NaN is flagged above, not summed)
                if Q_INF:
                    acc_q = tl.maximum(acc_q, a)
                else:
                    # pow(a, q) = exp(q log a) for a > 0; pow(0, q) = 0 for q >= 1
                    q = _f64(q_bits)
                    acc_q += tl.where(a > 0, tl.exp(q * tl.log(tl.where(a > 0, a, 1.0))), 0.0)
        resultant = tl.sum(sq, axis=0)
        if HEAD == STATS:
            if Q_INF:
                rho_q = tl.max(acc_q, axis=0)
            else:
                q = _f64(q_bits)
                total = tl.sum(acc_q, axis=0)
                rho_q = tl.where(total > 0, tl.exp(tl.log(tl.where(total > 0, total, 1.0)) / q), total)
            rho_q = tl.where(tl.max(nan_q, axis=0) > 0, _nan(), rho_q)

    if HEAD == STATS:
        # rho, rho_q, kappa (p = D, rho clamped), mean cosine, coherence, dpp: gram_statistics
        rho = _mrl(resultant, nf)
        kappa = tl.where(rho != rho, rho, _kappa_of(_clamp_rho(rho, rho_max), p))  # noqa: PLR0124
        mean_c, _ = _mean_cos(c, off, nf)
        flat = rows[:, None] * BLOCK_N + rows[None, :]
        coherence, _ = _max_cos(c, upper, flat, BLOCK_N)
        dpp, _ = _dpp(c, jitter, valid, is_diag, row_ok, rows, n)
        dst = out_ptr + b * 6
        tl.store(dst + 0, rho.to(acc_t))
        tl.store(dst + 1, rho_q.to(acc_t))
        tl.store(dst + 2, kappa.to(acc_t))
        tl.store(dst + 3, mean_c.to(acc_t))
        tl.store(dst + 4, coherence.to(acc_t))
        tl.store(dst + 5, dpp.to(acc_t))
    else:
        # ---- the head: loss and W = dL/dC (beta for Omega_S), head_forward
        w = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float64)
        beta = tl.zeros((BLOCK_N,), dtype=tl.float64)
        if HEAD == DPP:
            loss, w = _dpp(c, jitter, valid, is_diag, row_ok, rows, n)
        elif HEAD == MEAN:
            loss, w_mean = _mean_cos(c, off, nf)
            w = tl.where(off, w_mean, 0.0)
        elif HEAD == KAPPA:
            rho = _mrl(resultant, nf)
            loss = tl.where(rho != rho, rho, _kappa_of(_clamp_rho(rho, rho_max), p) / p)  # noqa: PLR0124
            # zero gradient above the clamp and at rho ~ 0 (kRhoFloor); the safe rho keeps the unused
            # branch finite (rho = 1 would divide by zero)
            live = (rho < rho_max) & (rho > tl.full((), _RHO_FLOOR, tl.float64))
            rs = tl.where(live, rho, 0.5)
            one_m = 1 - rs * rs
            dk_drho = (p * (1 + rs * rs) - 2 * rs) / (one_m * one_m)
            drho_ds = 1.0 / (2.0 * (nf * nf) * rs)
            w = tl.where(valid, tl.where(live, dk_drho / p * drho_ds, 0.0), 0.0)
        elif HEAD == MAX:
            flat = rows[:, None] * BLOCK_N + rows[None, :]
            loss, w = _max_cos(c, upper, flat, BLOCK_N)
        elif (HEAD == SMOOTHMAX) | (HEAD == GAL):
            # log sum exp over the pairs i != j (smoothmax) or i < j (GAL); the max skips NaN as
            # max_of does, the sum does not (a NaN cosine makes the loss NaN)
            if HEAD == SMOOTHMAX:
                in_set = off
            else:
                in_set = upper
            mx = tl.max(tl.where(in_set & (c == c), c, _NEG_INF))  # noqa: PLR0124
            e = tl.exp(tl.where(in_set, c - mx, _NEG_INF))
            z = tl.sum(e)
            w = e / z
            loss = mx + tl.log(z)
        elif HEAD == MEAN_PENALTY:
            w_mp = 1.0 / (nf * nf)
            loss = resultant * w_mp
            w = tl.where(valid, w_mp, 0.0)
        else:  # SPARSITY
            loss = -tl.sum(l1 * inv_r / nf, axis=0)
            beta = -inv_r / nf

        # Chain rule dL/dC -> dL/dS: off-diagonal W_ij / (r_i r_j); the diagonal collects
        # -C_ij (W_ij + W_ji) / (2 S_ii) over j != i; rows below the norm floor get nothing.
        if HEAD == SPARSITY:
            # W = 0 (and S holds only its diagonal): the l1 term alone
            diag = l1 * inv_r * inv_r * inv_r / (2 * nf)
            shat_off = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float64)
        else:
            diag = -tl.sum(tl.where(off, (w + tl.trans(w)) * c, 0.0), axis=1)
            diag = diag * (0.5 * inv_r * inv_r)
            shat_off = w * inv_r[:, None] * inv_r[None, :]
        diag = tl.where(inv_r != 0, diag, 0.0)
        shat = tl.where(is_diag, diag[:, None], shat_off)
        a = (shat + tl.trans(shat)) * scale[None, :]  # A'_ij s_j: the pullback multiplies row i by s_i
        # NaN rule: a NaN loss (NaN / Inf input) makes A and beta NaN
        bad = loss != loss  # noqa: PLR0124
        a = tl.where(bad, _nan(), a)
        beta = tl.where(bad, _nan(), beta)

        tl.store(out_ptr + b, loss.to(acc_t))
        tl.store(a_ptr + b * n * n + rows[:, None] * n + rows[None, :], a.to(acc_t), mask=valid)
        tl.store(rs_ptr + b * n + rows, scale.to(acc_t), mask=row_ok)
        if HEAD == SPARSITY:
            tl.store(beta_ptr + b * n + rows, beta.to(acc_t), mask=row_ok)


def _blocks(n: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, num_warps). Half the X tile of tile_blocks (2048 elements, not 4096), and 8
    warps from BLOCK_N = 16 on: the float64 head tiles live in registers next to it. For sm_90 (ptxas
    -v on Triton 3.9's output) this keeps every head at <= ~128 registers a thread without spills at
    BLOCK_N = 32, where 4 warps and the 4096-element tile spilled hundreds of bytes."""
    block_n, _ = tile_blocks(n, d)
    assert block_n <= MAX_FUSED_N
    block_d = min(triton.next_power_of_2(max(d, 1)), max(16, FUSED_TILE_ELEMS // block_n))
    return block_n, block_d, 8 if block_n >= 16 else 4


def _launch(x: torch.Tensor, out: torch.Tensor, a: torch.Tensor, beta: torch.Tensor, row_scale: torch.Tensor,
            code: int, eps: float, jitter: float, p: float, rho_max: float, q: float) -> None:
    B, n, d = x.shape
    block_n, block_d, num_warps = _blocks(n, d)
    safe, limit = scale_exponents(x.dtype)
    _fused_kernel[(B,)](x, out, a, beta, row_scale, n, d, x.stride(0), x.stride(1),
                        _f64_bits(eps), _f64_bits(jitter), _f64_bits(p), _f64_bits(rho_max),
                        _f64_bits(1.0 if math.isinf(q) else q),
                        HEAD=code, Q_INF=math.isinf(q), BLOCK_N=block_n, BLOCK_D=block_d, SAFE=safe, LIMIT=limit,
                        num_warps=num_warps)


def gram_loss(x: torch.Tensor, head: str, eps: float, jitter: float, p: float, rho_max: float):
    """Loss [B], A [B, n, n], beta [B, n] ([B, 0] unless sparsity) and the row scales [B, n], acc dtype, for
    n <= MAX_FUSED_N: one kernel launch (none for B = 0)."""
    h = parse_head(head)
    B, n, d = x.shape
    acc = acc_dtype(x.dtype)
    loss = torch.empty((B,), dtype=acc, device=x.device)
    a = torch.empty((B, n, n), dtype=acc, device=x.device)
    beta = torch.empty((B, n if h == "sparsity" else 0), dtype=acc, device=x.device)
    row_scale = torch.empty((B, n), dtype=acc, device=x.device)
    if B == 0:
        return loss, a, beta, row_scale
    p_eff = p if p > 0 else float(d)
    _launch(x, loss, a, beta if h == "sparsity" else a, row_scale, _HEAD_CODE[h], eps, jitter, p_eff, rho_max, 2.0)
    return loss, a, beta, row_scale


def concentration_stats(x: torch.Tensor, q: float, eps: float, jitter: float, rho_max: float) -> torch.Tensor:
    """[B, 6] acc: rho, rho_q, kappa, mean cosine, coherence, dpp, for n <= MAX_FUSED_N: one launch."""
    B, n, d = x.shape
    out = torch.empty((B, 6), dtype=acc_dtype(x.dtype), device=x.device)
    if B == 0:
        return out
    _launch(x, out, out, out, out, STATS.value, eps, jitter, float(d), rho_max, q)
    return out
