"""Intervals for method comparisons: over seeds (Student's t) and over seeds and prompts (a
paired, two-level bootstrap).  Pure functions on plain numbers."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# two-sided 95 % quantiles of Student's t, by degrees of freedom (larger: the normal's 1.96)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(df: int) -> float:
    if df < 1:
        raise ValueError("an interval needs at least two values")
    return next((v for d, v in sorted(_T975.items()) if df <= d), 1.96)


def mean_interval(values: Sequence[float | None]) -> tuple[float, float | None, float | None]:
    """(mean, low, high): the 95 % t-interval of the mean of ``values`` (one per seed; a None, a
    run without the figure, is left out); no interval from a single value."""
    x = [float(v) for v in values if v is not None]
    if not x:
        return float("nan"), None, None
    m = sum(x) / len(x)
    if len(x) < 2:
        return m, None, None
    sd = math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1))
    half = t975(len(x) - 1) * sd / math.sqrt(len(x))
    return m, m - half, m + half


def paired_bootstrap(diffs: Sequence[Sequence[float]], reps: int = 2000, seed: int = 0
                     ) -> tuple[float, float, float]:
    """(mean, low, high) of the mean paired difference, a 95 % percentile interval from a two-level
    bootstrap: seeds resampled with replacement, then each seed's prompts.  ``diffs[s][i]`` is
    method A's score minus method B's on prompt ``i`` of seed ``s`` (the same prompts for both)."""
    groups = [np.asarray(d, dtype=float) for d in diffs if len(d)]
    if not groups:
        raise ValueError("no paired differences")
    mean = float(np.mean([g.mean() for g in groups]))
    rng = np.random.default_rng(seed)
    stats = np.empty(reps)
    for r in range(reps):
        picked = rng.integers(0, len(groups), len(groups))
        stats[r] = np.mean([groups[s][rng.integers(0, len(groups[s]), len(groups[s]))].mean() for s in picked])
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return mean, float(lo), float(hi)


def separated(lo: float | None, hi: float | None) -> bool:
    """Whether an interval of a difference excludes zero."""
    return lo is not None and hi is not None and (lo > 0 or hi < 0)
