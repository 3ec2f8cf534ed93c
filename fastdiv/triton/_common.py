"""Launch parameters shared by the Triton launchers, the Gram tile loop shared by their kernels, and the row
scaling of rows whose squares leave the accumulation dtype's range (fastdiv/csrc/head_math.h, "Row scaling")."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Register budget of a program holding an n-row tile, in elements of the [BLOCK_N, BLOCK_D] tile.
TILE_ELEMS = 4096
#: Widest column block of the one-program-per-row kernels.
MAX_BLOCK_D = 1024


def block_d(d: int) -> int:
    """Column block for a row of d values: the next power of two, at most MAX_BLOCK_D."""
    return min(triton.next_power_of_2(max(d, 1)), MAX_BLOCK_D)


def acc_tl(dtype: torch.dtype):
    """The Triton accumulation dtype for inputs of ``dtype`` (fp64 for fp64, else fp32)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def tile_blocks(n: int, d: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_D) of a [n, d] tile: n padded to a power of two, columns within TILE_ELEMS."""
    block_n = triton.next_power_of_2(max(n, 1))
    return block_n, min(triton.next_power_of_2(max(d, 1)), max(16, TILE_ELEMS // block_n))


@triton.jit
def load_tile(base, rows, row_ok, d0, cols, col_ok, stride_n, acc_t: tl.constexpr):
    """The [BLOCK_N, BLOCK_D] tile of rows ``rows`` and columns d0 + cols of one input, as acc_t
    (0 outside the n rows and D columns)."""
    return tl.load(base + rows[:, None].to(tl.int64) * stride_n + (d0 + cols)[None, :],
                   mask=row_ok[:, None] & col_ok[None, :], other=0).to(acc_t)


@triton.jit
def tile_gram(tile, base, rows, d0, cols, col_ok, n, stride_n, BLOCK_N: tl.constexpr):
    """This D tile's share of S = X X^T, [BLOCK_N, BLOCK_N] in the tile's dtype: column j of S is the
    tile times row j, re-read from L1/L2 (a register tile cannot be indexed by row)."""
    s = tl.zeros((BLOCK_N, BLOCK_N), dtype=tile.dtype)
    xj_ptr = base + d0 + cols  # row j, advanced as a 64-bit pointer (j * stride_n may pass 2^31)
    for j in range(n):
        xj = tl.load(xj_ptr, mask=col_ok, other=0).to(tile.dtype)
        sj = tl.sum(tile * xj[None, :], axis=1)  # column j of S over this tile
        s += tl.where(rows[None, :] == j, sj[:, None], 0)
        xj_ptr += stride_n
    return s


@triton.jit
def tile_gram_scaled(tile, base, rows, d0, cols, col_ok, n, stride_n, scale, BLOCK_N: tl.constexpr):
    """tile_gram of the rows y_i = scale_i x_i: ``tile`` already holds y, row j is re-read and scaled."""
    s = tl.zeros((BLOCK_N, BLOCK_N), dtype=tile.dtype)
    xj_ptr = base + d0 + cols
    for j in range(n):
        sj = tl.sum(tl.where(rows == j, scale, 0.0), axis=0).to(tile.dtype)
        xj = tl.load(xj_ptr, mask=col_ok, other=0).to(tile.dtype) * sj
        cj = tl.sum(tile * xj[None, :], axis=1)
        s += tl.where(rows[None, :] == j, cj[:, None], 0)
        xj_ptr += stride_n
    return s


# Row scaling, as fastdiv/csrc/head_math.h ("Row scaling"): a row needs a scale when its largest |x| is
# finite, nonzero and outside [2^-SAFE, 2^SAFE]; an input with such a row uses every row as s x with
# s = 2^-e, max |x| = f 2^e, f in [0.5, 1), |e| <= LIMIT. An unscaled sum of squares of d values is suspect
# outside [d 2^(2 - 2 SAFE), 2^(2 SAFE - 2)]. (SAFE, LIMIT) per accumulation dtype:
SCALE_FLOAT = (40, 126)
SCALE_DOUBLE = (450, 1022)


def scale_exponents(dtype: torch.dtype) -> tuple[int, int]:
    """(SAFE, LIMIT) of inputs of ``dtype``: the accumulation dtype decides."""
    return SCALE_DOUBLE if dtype == torch.float64 else SCALE_FLOAT


@triton.jit
def pow2(k):
    """2^k as a float64 (k an integer in [-1022, 1023]), built from its bits: a Python float constant would
    be typed fp32 (2^-450 is 0 there)."""
    return ((k + 1023).to(tl.int64) << 52).to(tl.float64, bitcast=True)


@triton.jit
def square_out_of_range(sq, d, SAFE: tl.constexpr):
    """True where a float64 sum of squares of d values accumulated unscaled is suspect (outside
    [d 2^(2 - 2 SAFE), 2^(2 SAFE - 2)]; 0 and Inf included, NaN not)."""
    lo = pow2(tl.full((), 2 - 2 * SAFE, tl.int64)) * d
    hi = pow2(tl.full((), 2 * SAFE - 2, tl.int64))
    return (sq == sq) & ((sq < lo) | (sq > hi))  # noqa: PLR0124 (NaN test)


@triton.jit
def needs_scale(m, SAFE: tl.constexpr):
    """True where a row's largest |x| (float64) m is finite, nonzero and outside [2^-SAFE, 2^SAFE]."""
    field = (m.to(tl.int64, bitcast=True) >> 52) & 0x7FF  # 0x7FF: NaN or Inf
    lo = pow2(tl.full((), -SAFE, tl.int64))
    hi = pow2(tl.full((), SAFE, tl.int64))
    return (field != 0x7FF) & (m > 0) & ((m < lo) | (m > hi))


@triton.jit
def row_scale(m, LIMIT: tl.constexpr):
    """Scales s (float64) of rows with largest |x| m (float64): 2^-e, e the exponent of m = f 2^e
    (f in [0.5, 1)) from its bits, clamped to [-LIMIT, LIMIT] (a subnormal m has the exponent field 0 and
    is clamped too); 1 for 0, NaN and Inf."""
    field = (m.to(tl.int64, bitcast=True) >> 52) & 0x7FF  # 0x7FF: NaN or Inf
    e = tl.minimum(tl.maximum(field - 1022, -LIMIT), LIMIT)
    return tl.where((field == 0x7FF) | (m <= 0), 1.0, pow2(-e))
