"""Seed noise: how far a mean over a few seeds may be from the configuration's true mean.

A cell's interval is the 95 % Student-t interval over its seeds, mean ± t(0.975, n − 1) · s / √n
with s the sample standard deviation: what a reader needs to decide whether kernel A beats kernel
B, or whether our mean is the paper's. It is not clipped to the metric's range, so it states the
method exactly; one seed gives no interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
METHOD = "95 % Student-t interval over seeds: mean ± t(0.975, n−1)·s/√n, s the seeds' sample std"


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """(low, high) of the 95 % t interval of the mean of `values`; (NaN, NaN) for fewer than two."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return math.nan, math.nan
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1) * values.std(ddof=1)
    half /= math.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two intervals (low, high) share a point: two values inside each other's noise."""
    return a[0] <= b[1] and b[0] <= a[1]
