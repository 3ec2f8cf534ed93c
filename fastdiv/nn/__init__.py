"""Randomized and ensemble models whose n sample models run in one batched pass (DESIGN.md §1).

:mod:`fastdiv.nn.sampling` defines how: a replicated batch plus per-sample draws.
"""
from .sampling import (
    RandomizedModule,
    SampleState,
    frozen_sample,
    is_randomized,
    sample_models,
    sampling,
    supports_batched,
)

__all__ = [
    "RandomizedModule", "SampleState", "frozen_sample", "is_randomized", "sample_models", "sampling",
    "supports_batched",
]
