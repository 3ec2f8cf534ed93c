"""Triton kernels of fastdiv: plain launcher functions with the semantics of the C++ ops
``torch.ops.fastdiv.<name>`` (fastdiv/csrc/ops.cpp). x is [B, n, D] with unit stride on D and any strides on B
and n; outputs are contiguous; accumulation is fp32 (fp64 for fp64 inputs); no atomics.

This package imports triton at import time; import it lazily from the rest of fastdiv. Inputs are
validated upstream (fastdiv/ops); the launchers do not re-check them.
"""
from .eot import eot_step
from .gram import concentration_stats, gram, gram_loss, gram_pullback
from .rows import column_stats, column_stats_pullback, normalize, normalize_pullback

__all__ = [
           "column_stats",
           "column_stats_pullback",
           "concentration_stats",
           "eot_step",
           "gram",
           "gram_loss",
           "gram_pullback",
           "normalize",
           "normalize_pullback",
]
