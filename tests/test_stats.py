"""histosynth.stats and the report's verdict against hand-computed values and scipy."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats

from classifier.downstream import DOWNSTREAM as CLASSIFICATION
from experiments.config import ArmConfig, SyntheticConfig
from experiments.report import summarise
from histosynth.stats import holm, paired_test, sign_flip_test, t_interval


def test_t_interval_by_hand_and_scipy():
    v = [0.70, 0.80, 0.75, 0.90]
    r = t_interval(v)
    sd = math.sqrt(sum((x - 0.7875) ** 2 for x in v) / 3)              # sample sd, by hand
    half = 3.182446305284263 * sd / 2                                   # t(0.975, 3) * sd / sqrt(4)
    assert r["mean"] == pytest.approx(0.7875) and r["std"] == pytest.approx(sd)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((0.7875 - half, 0.7875 + half))
    lo, hi = stats.t.interval(0.95, 3, loc=np.mean(v), scale=stats.sem(v))
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((lo, hi))
    assert math.isnan(t_interval([0.5])["ci_low"]) and t_interval([0.5])["mean"] == 0.5
    assert t_interval([float("nan"), 0.4, 0.6])["n"] == 2                # NaNs are dropped


def test_paired_t_test_equals_scipy():
    a, b = [0.81, 0.77, 0.85, 0.79, 0.88], [0.78, 0.76, 0.80, 0.80, 0.82]
    r = paired_test(a, b)
    assert r["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert r["mean_diff"] == pytest.approx(np.mean(np.subtract(a, b))) and r["test"] == "paired t-test"
    w = paired_test(a, b, "wilcoxon")
    assert w["p"] == pytest.approx(stats.wilcoxon(np.subtract(a, b)).pvalue)


def test_equal_differences_are_never_significant_by_zero_variance():
    """Two seeds, both +0.1: the t statistic is infinite; the verdict must not call it p = 0."""
    r = paired_test([0.6, 0.7], [0.5, 0.6])
    assert r["p"] == pytest.approx(0.5) and "sign-flip" in r["test"]       # 2 of the 4 sign patterns
    assert paired_test([0.6] * 5, [0.5] * 5)["p"] == pytest.approx(2 / 32)
    assert paired_test([0.5, 0.6], [0.5, 0.6])["p"] == 1.0                 # no difference at all
    assert math.isnan(paired_test([0.5], [0.4])["p"])                       # one pair: not testable


def test_sign_flip_test_by_hand():
    # d = 1, 2, 3: only all-plus and all-minus reach |mean| 2 -> 2 of 8 patterns
    assert sign_flip_test([1.0, 2.0, 3.0]) == pytest.approx(2 / 8)
    # d = 3, -1: |mean| 1; patterns (3,-1) (-3,1) give 1, (3,1) (-3,-1) give 2 -> all 4
    assert sign_flip_test([3.0, -1.0]) == pytest.approx(1.0)
    # the exact test equals brute-force enumeration on a random example
    d = np.random.default_rng(0).normal(0.05, 0.1, 7)
    brute = np.mean([abs(np.mean(d * s)) >= abs(d.mean()) - 1e-12
                     for s in np.array(np.meshgrid(*[[-1, 1]] * 7)).reshape(7, -1).T])
    assert sign_flip_test(d) == pytest.approx(brute)
    assert paired_test(d + 1, np.ones(7), "permutation")["p"] == pytest.approx(brute)


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 -> x3, x2, x1 = 0.03, 0.06, 0.04 -> running max 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])                   # capped at 1
    out = holm([0.02, float("nan"), 0.01])
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)


def _rows(arm: str, values: list[float], **extra) -> list[dict]:
    return [{"arm": arm, "seed": str(s), "n_train_real": "100", "n_train_synthetic": "0",
             **{m: str(extra.get(m, v)) for m in CLASSIFICATION.spec.names}} for s, v in enumerate(values)]


def _summary(rows, arms, seeds=5):
    report = SimpleNamespace(baseline="real_only", primary="balanced_accuracy", alpha=0.05, test="t")
    return summarise(rows, arms, CLASSIFICATION.spec, CLASSIFICATION.chance(["a", "b", "c"]), report,
                     {"n_test": 90})


def test_verdict_says_what_the_numbers_support():
    base = [0.60, 0.62, 0.58, 0.61, 0.59]
    arms = [ArmConfig("real_only"), ArmConfig("better"), ArmConfig("worse"),
            ArmConfig("gan", synthetic=SyntheticConfig("gan", ratio=1.0)), ArmConfig("control", labels="shuffled")]
    rows = (_rows("real_only", base) + _rows("better", [v + 0.10 + 0.01 * i for i, v in enumerate(base)])
            + _rows("worse", [v - 0.20 + 0.01 * i for i, v in enumerate(base)])
            + _rows("gan", [v + (0.01 if i % 2 else -0.01) for i, v in enumerate(base)])
            + _rows("control", [0.33, 0.34, 0.32, 0.35, 0.33]))
    s = _summary(rows, arms)
    v = s["verdict"]
    assert "Significantly better than real_only at alpha 0.05: better (+0.120" in v
    assert "Significantly worse than real_only: worse (-0.180" in v
    assert "No significant difference from real_only: gan" in v
    assert "do not support that synthetic data improves balanced accuracy" in v
    assert "control stayed near chance" in v and "With only" not in v          # 5 seeds: no warning
    # Holm adjusts over the compared arms but not the control
    assert "p_holm" not in s["comparisons"]["control"]["balanced_accuracy"]
    ps = [s["comparisons"][n]["balanced_accuracy"]["p"] for n in ("better", "worse", "gan")]
    assert [s["comparisons"][n]["balanced_accuracy"]["p_holm"] for n in ("better", "worse", "gan")] == \
        pytest.approx(holm(ps))


def test_verdict_warns_about_a_control_above_chance_and_few_seeds():
    arms = [ArmConfig("real_only"), ArmConfig("control", labels="shuffled")]
    rows = _rows("real_only", [0.8, 0.82, 0.79]) + _rows("control", [0.75, 0.78, 0.77])
    v = _summary(rows, arms)["verdict"]
    assert "WARNING: the label-shuffled control control reached balanced accuracy" in v
    assert "With only 3 seed(s)" in v
