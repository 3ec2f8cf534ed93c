"""``fastdiv reproduce``: the five papers' central claims as experiments, paper against measured, with a verdict.

Each :class:`Claim` names the paper's figure or table and numbers, the defense and the baseline (presets, the
papers' recipes scaled to the dataset), what is measured and the direction the paper reports. :func:`reproduce`
trains both arms of every chosen claim on each seed, measures them and judges the per-seed differences
(:func:`judge`: reproduced / not reproduced / inconclusive, with the effect size and its seed-to-seed spread).
``docs/reproduction.md`` holds the measured table.
"""
from .claims import CLAIMS, SIZES, Arm, Claim, describe_claims, resolve_claims
from .measure import MEASURES, Measured
from .run import reproduce
from .verdict import MIN_SEEDS, VERDICTS, judge

__all__ = ["CLAIMS", "MEASURES", "MIN_SEEDS", "SIZES", "VERDICTS", "Arm", "Claim", "Measured", "describe_claims",
           "judge", "reproduce", "resolve_claims"]
