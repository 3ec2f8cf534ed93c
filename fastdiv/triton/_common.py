"""Launch parameters shared by the Triton launchers, and the Gram tile loop shared by their kernels."""
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
