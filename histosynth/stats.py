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


def sign_flip_test(d, max_exact: int = 16, draws: int = 100_000, seed: int = 0) -> float:
    """Two-sided p of the paired sign-flip permutation test of mean(d) = 0: under the null every
    difference is as likely negative as positive, so p is the share of the 2^n sign patterns whose
    |mean| is at least the observed one (exact up to ``max_exact`` pairs, else ``draws`` seeded
    random patterns). Defined for any n >= 1 and any variance; its smallest value is 2 / 2^n."""
    d = np.asarray(d, dtype=np.float64)
    n = d.size
    if n == 0:
        return float("nan")
    observed = abs(d.mean())
    if n <= max_exact:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)      # 2^n x n of +-1
    else:
        signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(draws, n))
    means = np.abs((signs * d).mean(axis=1))
    return float(np.mean(means >= observed - 1e-12 * max(1.0, observed)))


PAIRED_TESTS = {"t": "paired t-test", "wilcoxon": "Wilcoxon signed-rank",
                "permutation": "sign-flip permutation test"}


def paired_test(a, b, test: str = "t", level: float = 0.95) -> dict[str, float]:
    """Paired comparison of ``a`` with ``b`` (same seeds, same order): the mean difference a - b,
    its t interval and the two-sided p of a paired t-test (``t``), a Wilcoxon signed-rank test
    or an exact sign-flip permutation test (``permutation``).

    Where the chosen test is undefined -- every difference equal and non-zero (zero variance, e.g.
    two seeds on a small test split): the t statistic is infinite, not significant -- the
    sign-flip test is used instead and ``test`` says so. Fewer than two pairs: p is NaN (not
    testable). All differences zero: p = 1."""
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    d = a[ok] - b[ok]
    out = t_interval(d, level)
    out = {"n": out["n"], "mean_diff": out["mean"], "ci_low": out["ci_low"], "ci_high": out["ci_high"],
           "test": PAIRED_TESTS[test], "p": float("nan")}
    if d.size < 2:
        return out
    if np.allclose(d, 0):
        out["p"] = 1.0
    elif test == "permutation" or (test == "t" and np.allclose(d, d[0])):
        if test != "permutation":
            out["test"] = f"{PAIRED_TESTS['permutation']} (the t-test is undefined: every difference equal)"
        out["p"] = sign_flip_test(d)
    elif test == "t":
        out["p"] = float(stats.ttest_rel(a[ok], b[ok]).pvalue)
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
