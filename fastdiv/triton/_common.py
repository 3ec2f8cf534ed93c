"""Launch parameters shared by the Triton launchers."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..ops._common import acc_dtype  # noqa: F401  (re-exported: the launchers' output dtype rule)

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
