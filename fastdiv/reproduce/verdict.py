"""The verdict of one claim from its measured per-seed numbers.

Each seed trains the defense and its baseline with the same seed and measures both; the *effect* of that seed is
``defense − baseline``. Over k seeds the effect has a mean m and a sample standard deviation s (the seed-to-seed
spread), and the mean's standard error is ``s / √k``. With ``d = +1`` when the paper says the defense is higher
and ``−1`` when it says lower:

* **reproduced** — ``d·m > 0`` and ``|m| > 2 s/√k`` (about a 95 % two-sided interval that excludes zero);
* **not reproduced** — ``d·m < 0`` and ``|m| > 2 s/√k``: a clear effect in the opposite direction;
* **inconclusive** — the interval contains zero, or fewer than :data:`MIN_SEEDS` seeds (a spread estimated
  from one or two differences says too little: two equal differences would give a zero spread and a verdict
  from any effect).

An effect of the right sign that is far smaller than the paper's is still "reproduced" in direction; the report
prints the paper's effect beside the measured one so a reader can compare sizes.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["MIN_SEEDS", "VERDICTS", "judge"]

VERDICTS = ("reproduced", "not reproduced", "inconclusive")
#: The fewest seeds that give a verdict other than inconclusive.
MIN_SEEDS = 3


def judge(defense: Sequence[float], baseline: Sequence[float], better: str) -> dict:
    """The verdict of per-seed measurements ``defense[i]`` vs ``baseline[i]`` (same seeds, same order) for a
    claim that the defense is ``better`` = 'higher' or 'lower'. Returns ``{verdict, effect, spread,
    standard_error, seeds, defense_mean, baseline_mean, reason}``."""
    if better not in ("higher", "lower"):
        raise ValueError(f"judge: better must be 'higher' or 'lower', got {better!r}")
    if len(defense) != len(baseline) or not defense:
        raise ValueError(f"judge: need one defense and one baseline number per seed, got {len(defense)} and "
                         f"{len(baseline)}")
    pairs = [(float(a), float(b)) for a, b in zip(defense, baseline)]
    if any(not (math.isfinite(a) and math.isfinite(b)) for a, b in pairs):
        return _record("inconclusive", pairs, math.nan, math.nan, "a measurement is not finite")
    effects = [a - b for a, b in pairs]
    k = len(effects)
    mean = sum(effects) / k
    spread = math.sqrt(sum((e - mean) ** 2 for e in effects) / (k - 1)) if k > 1 else math.nan
    se = spread / math.sqrt(k) if k > 1 else math.nan
    sign = 1.0 if better == "higher" else -1.0
    if k < MIN_SEEDS:
        verdict, reason = "inconclusive", f"{k} seed(s): at least {MIN_SEEDS} are needed to judge the spread"
    elif abs(mean) > 2 * se and sign * mean > 0:
        verdict, reason = "reproduced", f"the effect is {better} by more than 2 standard errors"
    elif abs(mean) > 2 * se:
        verdict, reason = "not reproduced", "the effect is clearly in the opposite direction (beyond 2 standard errors)"
    else:
        verdict, reason = "inconclusive", "the effect is within 2 standard errors of zero"
    return _record(verdict, pairs, spread, se, reason, mean)


def _record(verdict: str, pairs, spread: float, se: float, reason: str, mean: float = math.nan) -> dict:
    k = len(pairs)
    return {"verdict": verdict, "effect": mean, "spread": spread, "standard_error": se, "seeds": k,
            "defense_mean": sum(a for a, _ in pairs) / k, "baseline_mean": sum(b for _, b in pairs) / k,
            "reason": reason}
