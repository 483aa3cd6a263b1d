"""Latency statistics (numpy only)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PERCENTILES = (50, 90, 99)


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """mean, p50, p90, p99, min, max and sample standard deviation, in milliseconds.

    Percentiles use linear interpolation between order statistics (numpy's default), so p50 of
    [1, 2, 3, 4] ms is 2.5 ms. The standard deviation uses n - 1 (a sample of all possible runs).
    """
    values = np.asarray(seconds, dtype=np.float64) * 1e3
    if values.size == 0:
        raise ValueError("no samples")
    out = {"n": float(values.size), "mean_ms": float(values.mean()), "min_ms": float(values.min()),
           "max_ms": float(values.max()),
           "stdev_ms": float(values.std(ddof=1)) if values.size > 1 else 0.0}
    for p in PERCENTILES:
        out[f"p{p}_ms"] = float(np.percentile(values, p))
    return out
