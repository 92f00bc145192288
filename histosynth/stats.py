"""Summaries with uncertainty: mean, std and a bootstrap 95 % confidence interval."""

from __future__ import annotations

import numpy as np


_EMPTY = {"n": 0, "mean": float("nan"), "std": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}


def _finite(values) -> tuple[np.ndarray, int]:
    """The finite values as float64, and how many there are (NaNs and infinities are dropped)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return v, int(v.size)


def mean_ci(values, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Mean, standard deviation and a percentile-bootstrap CI of the mean of ``values``.

    NaNs are dropped; with fewer than two values the interval is the value itself.
    """
    v, n = _finite(values)
    if n == 0:
        return dict(_EMPTY)
    mean = float(v.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "std": 0.0, "ci_low": mean, "ci_high": mean}
    rng = np.random.default_rng(seed)
    # resamples drawn in blocks of ~4M indices: memory stays bounded for any n (one (n_boot, n)
    # draw is 3.2 GB at n = 100k); the generator's stream, hence the result, is the same
    rows = max(1, 4_000_000 // n)
    boots = np.concatenate([v[rng.integers(0, n, size=(min(rows, n_boot - i), n))].mean(axis=1)
                            for i in range(0, n_boot, rows)])
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"n": n, "mean": mean, "std": float(v.std(ddof=1)), "ci_low": float(lo), "ci_high": float(hi)}


def t_interval(values, level: float = 0.95) -> dict[str, float]:
    """Mean, standard deviation and Student-t CI of the mean (the usual interval over a few seeds)."""
    from scipy import stats

    v, n = _finite(values)
    if n == 0:
        return dict(_EMPTY)
    mean = float(v.mean())
    if n == 1:
        return {**_EMPTY, "n": 1, "mean": mean}
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / np.sqrt(n)
    return {"n": n, "mean": mean, "std": sd, "ci_low": mean - half, "ci_high": mean + half}


def paired_test(a, b, test: str = "t", level: float = 0.95) -> dict[str, float]:
    """Paired comparison of ``a`` with ``b`` (same seeds, same order): the mean difference a - b,
    its t interval and the two-sided p of a paired t-test (``t``) or Wilcoxon signed-rank test."""
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    d = a[ok] - b[ok]
    out = t_interval(d, level)
    out = {"n": out["n"], "mean_diff": out["mean"], "ci_low": out["ci_low"], "ci_high": out["ci_high"],
           "test": "paired t-test" if test == "t" else "Wilcoxon signed-rank", "p": float("nan")}
    if d.size >= 2:
        if np.allclose(d, 0):
            out["p"] = 1.0
        elif test == "t":
            out["p"] = float(stats.ttest_rel(a[ok], b[ok]).pvalue) if d.std() > 0 else 0.0
        else:
            out["p"] = float(stats.wilcoxon(d).pvalue)
    return out


def holm(pvalues) -> list[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error over several comparisons); NaN stays NaN."""
    p = np.asarray(pvalues, dtype=np.float64)
    idx = [i for i in np.argsort(p) if np.isfinite(p[i])]
    m, running = len(idx), 0.0
    adj = np.full(p.shape, np.nan)
    for rank, i in enumerate(idx):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adj[i] = running
    return adj.tolist()
