"""Seed derivation shared by the samplers, the attacks and the training driver."""
from __future__ import annotations

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A 63-bit generator seed from integers (splitmix64 finalizer): nearby seeds, layer ordinals,
    epochs or steps give unrelated random streams, and the result depends on nothing else."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) & _MASK64
        h = (h * 0xBF58476D1CE4E5B9) & _MASK64
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 29
    return h & ((1 << 63) - 1)
