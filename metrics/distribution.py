"""Distribution metrics between real and synthetic feature sets, with bootstrap CIs.

* FID and KID: piq (``piq.FID().compute_metric``, ``piq.KID().compute_metric``).
* Precision, recall, density and coverage: ``prdc``, the reference implementation of Naeem et
  al., ICML 2020 (k nearest neighbours, k = 5 by default).

FID is strongly biased at small sample sizes (and its covariance is singular when a set has fewer
samples than feature dimensions): :func:`distribution_metrics` warns and points to KID, which is
unbiased. Intervals come from repeated subsampling of 80 % of each set without replacement
(resampling *with* replacement would put duplicate points into the nearest-neighbour metrics and
give zero radii); they show sampling variability, not a strict 95 % CI of the full-set value. As
FID falls with the number of samples, the subsamples' values sit above the full-set value; the
interval is their 2.5-97.5 % spread placed around the full-set value (value + quantile - median),
so a value always lies inside its own interval.

Precision/recall/density/coverage need the full pairwise distance matrices of both sets (O(N^2)
memory: 80 GB at 100k tiles), so beyond ``prdc_max`` samples per set they are computed on a seeded
subsample of that size (as StudioGAN and the Naeem paper use 10k); FID and KID use every sample.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import joblib
import numpy as np
import piq
import torch

FID_MIN_SAMPLES = 2048
PRDC_MAX_SAMPLES = 10_000


class SmallSampleWarning(UserWarning):
    """A set is too small for a trustworthy FID; compare KID instead."""


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """piq's FID. When the two sets together have fewer samples than dimensions (per-class sets,
    subsamples), both are first written in an orthonormal basis of the subspace spanned by their
    centred samples and the difference of their means: FID depends only on the means and the
    covariances, which live in that subspace, so the value is unchanged (to rounding: checked
    against piq on the full space and scipy's sqrtm in the tests), while piq's Newton-Schulz square
    root works on k x k instead of d x d matrices (21 samples of 1280-d: 3.5 s -> 0.02 s)."""
    k = real.shape[0] + fake.shape[0] + 1
    if k < real.shape[1]:
        mr, mf = real.mean(0), fake.mean(0)
        basis, _ = torch.linalg.qr(torch.cat([real - mr, fake - mf, (mr - mf)[None]]).T)   # d x k
        real, fake = real @ basis, fake @ basis
    return float(piq.FID().compute_metric(real, fake))


def kid(real: torch.Tensor, fake: torch.Tensor, seed: int = 0) -> float:
    size = min(1000, real.shape[0], fake.shape[0])
    # several subsets only when they can differ (a set larger than the subset)
    n_subsets = 50 if max(real.shape[0], fake.shape[0]) > size else 1
    with torch.random.fork_rng(devices=[]):    # piq draws subsets from the global generator:
        torch.manual_seed(seed)                # seed it here without disturbing the caller's
        return float(piq.KID(average=True, subset_size=size, n_subsets=n_subsets)
                     .compute_metric(real, fake))


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict[str, float]:
    from prdc import compute_prdc

    k = max(1, min(k, real.shape[0] - 2, fake.shape[0] - 2))   # prdc needs k + 1 < n
    # prdc prints the set sizes, and asks scikit-learn for 8 joblib workers per distance matrix:
    # process start-up then costs ~100x the arithmetic (BLAS already uses every core)
    with contextlib.redirect_stdout(io.StringIO()), joblib.parallel_config(backend="sequential"):
        out = compute_prdc(real.double().numpy(), fake.double().numpy(), nearest_k=k)
    return {name: float(v) for name, v in out.items()}


def _cap(x: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    if x.shape[0] <= n:
        return x
    g = torch.Generator().manual_seed(seed)
    return x[torch.randperm(x.shape[0], generator=g)[:n]]


def _point(real: torch.Tensor, fake: torch.Tensor, k: int, seed: int, prdc_max: int) -> dict[str, float]:
    return {"fid": fid(real, fake), "kid": kid(real, fake, seed),
            **prdc(_cap(real, prdc_max, seed), _cap(fake, prdc_max, seed + 1), k)}


def distribution_metrics(real: torch.Tensor, fake: torch.Tensor, k: int = 5, n_boot: int = 10,
                         seed: int = 0, prdc_max: int = PRDC_MAX_SAMPLES) -> dict[str, dict[str, float]]:
    """FID, KID, precision, recall, density, coverage of two ``N x D`` feature sets.

    Each metric: ``{"value", "ci_low", "ci_high", "n_real", "n_fake"}`` (the precision/recall
    family also ``n_used``: at most ``prdc_max`` per set); the interval is the 2.5-97.5 % range
    over ``n_boot`` subsamples of 80 % of both sets (0: no interval).
    """
    real, fake = real.detach().double().cpu(), fake.detach().double().cpu()
    n_min, dim = min(real.shape[0], fake.shape[0]), real.shape[1]
    if n_min < 3:
        raise ValueError(f"need at least 3 samples per set, got {real.shape[0]} real and {fake.shape[0]} fake")
    if n_min < max(FID_MIN_SAMPLES, dim):
        warnings.warn(f"only {n_min} samples for {dim}-d features: FID is biased upwards at this size"
                      f"{' and its covariance is singular' if n_min <= dim else ''}; compare sets "
                      "by KID (unbiased) and use FID only between sets of equal size",
                      SmallSampleWarning, stacklevel=2)
    point = _point(real, fake, k, seed, prdc_max)
    rng = np.random.default_rng(seed)
    boots = []
    for b in range(n_boot):
        ri = torch.from_numpy(rng.permutation(real.shape[0])[: max(3, int(0.8 * real.shape[0]))])
        fi = torch.from_numpy(rng.permutation(fake.shape[0])[: max(3, int(0.8 * fake.shape[0]))])
        boots.append(_point(real[ri], fake[fi], k, seed + b + 1, prdc_max))
    out = {}
    for name, value in point.items():
        vals = np.array([b[name] for b in boots]) if boots else np.array([value])
        lo, hi = value + np.quantile(vals, [0.025, 0.975]) - np.median(vals)
        out[name] = {"value": value, "ci_low": float(lo), "ci_high": float(hi),
                     "n_real": int(real.shape[0]), "n_fake": int(fake.shape[0])}
        if name not in ("fid", "kid"):
            out[name]["n_used"] = [min(real.shape[0], prdc_max), min(fake.shape[0], prdc_max)]
    return out
