"""Summary statistics over samples in milliseconds."""
from __future__ import annotations

import math


def pct(xs, p: float) -> float:
    """The p-th percentile (0..100) of xs, linear interpolation; NaN when empty."""
    if not xs:
        return math.nan
    s = sorted(xs)
    k = (len(s) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def pcts(xs, ps=(50, 90, 99)) -> dict:
    """{"p50": .., "p90": .., "p99": ..} of xs (one sort)."""
    if not xs:
        return {f"p{p}": math.nan for p in ps}
    s = sorted(xs)
    out = {}
    for p in ps:
        k = (len(s) - 1) * p / 100.0
        lo = math.floor(k)
        hi = min(lo + 1, len(s) - 1)
        out[f"p{p}"] = s[lo] + (s[hi] - s[lo]) * (k - lo)
    return out
