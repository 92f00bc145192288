"""Summaries with uncertainty: mean, std and a bootstrap 95 % confidence interval."""

from __future__ import annotations

import numpy as np


def mean_ci(values, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean, standard deviation and a percentile-bootstrap CI of the mean of ``values``.

    NaNs are dropped; with fewer than two values the interval is the value itself.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    n = int(v.size)
    if n == 0:
        return {"n": 0, "mean": float("nan"), "std": float("nan"), "ci_low": float("nan"),
                "ci_high": float("nan")}
    mean = float(v.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "std": 0.0, "ci_low": mean, "ci_high": mean}
    rng = np.random.default_rng(seed)
    boots = v[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"n": n, "mean": mean, "std": float(v.std(ddof=1)), "ci_low": float(lo), "ci_high": float(hi)}
