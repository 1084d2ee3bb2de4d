"""The statistics module on known answers: coverage, TOST, Holm by hand, AUROC, verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from mmlens.metrics.stats import (
    Interval,
    auc,
    auroc,
    auroc_difference,
    bootstrap_ci,
    holm,
    permutation_test,
    spearman,
    tost,
    verdict,
)


def test_bootstrap_interval_covers_a_known_mean_at_roughly_the_nominal_rate():
    rng = np.random.default_rng(0)
    trials = 200
    hits = sum(
        bootstrap_ci(rng.normal(1.0, 2.0, 40), n_resamples=400, seed=t).excludes(1.0) is False for t in range(trials)
    )
    assert 0.88 <= hits / trials <= 0.99, hits / trials


def test_bootstrap_interval_shrinks_with_n_and_is_seeded():
    rng = np.random.default_rng(1)
    small, large = rng.normal(0, 1, 20), rng.normal(0, 1, 2000)
    a, b = bootstrap_ci(small, seed=3), bootstrap_ci(large, n_resamples=500, seed=3)
    assert a.high - a.low > 3 * (b.high - b.low)
    assert bootstrap_ci(small, seed=3) == a
    assert a.low < a.estimate < a.high


def test_paired_bootstrap_sees_a_shift_that_unpaired_noise_would_hide():
    rng = np.random.default_rng(2)
    base = rng.normal(0, 10, 50)  # large between-item spread
    x, y = base + 0.5 + rng.normal(0, 0.1, 50), base
    paired = bootstrap_ci(x, paired_with=y, n_resamples=1000)
    assert paired.low > 0.4 and paired.high < 0.6 and "paired" in paired.method


def test_constant_sample_gives_a_degenerate_interval():
    ci = bootstrap_ci(np.full(10, 3.0))
    assert (ci.estimate, ci.low, ci.high) == (3.0, 3.0, 3.0) and "constant" in ci.method


def test_bad_inputs_raise_with_the_field():
    with pytest.raises(ValueError, match="x has 1 values"):
        bootstrap_ci([1.0])
    with pytest.raises(ValueError, match="non-finite"):
        bootstrap_ci([1.0, np.nan, 2.0])
    with pytest.raises(ValueError, match="paired_with has 2 values"):
        bootstrap_ci([1.0, 2.0, 3.0], paired_with=[1.0, 2.0])
    with pytest.raises(ValueError, match="low < high"):
        tost([1.0, 2.0], [1.0, 2.0], low=0.1, high=-0.1)


def test_tost_equivalent_on_identical_samples_and_not_on_shifted_ones():
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, 200)
    same = tost(x, x.copy(), low=-0.3, high=0.3)
    assert same.equivalent and same.p_value < 0.01
    shifted = tost(x + 1.0, x, low=-0.3, high=0.3)
    assert not shifted.equivalent and shifted.p_value > 0.5
    paired = tost(x, x.copy(), low=-0.1, high=0.1, paired=True)  # zero spread: exact answer
    assert paired.equivalent and paired.p_value == 0.0
    paired_shift = tost(x + 0.2, x, low=-0.1, high=0.1, paired=True)
    assert not paired_shift.equivalent and paired_shift.p_value == 1.0


def test_tost_is_two_one_sided_tests():
    rng = np.random.default_rng(4)
    x = rng.normal(0.25, 1, 400)  # near the upper bound: the upper test decides
    res = tost(x, low=-0.3, high=0.3)
    assert res.p_value == max(res.p_lower, res.p_upper) and res.p_upper > res.p_lower


def test_holm_against_a_hand_example():
    # sorted p: 0.01, 0.02, 0.03, 0.04 -> 4*0.01=0.04, 3*0.02=0.06, 2*0.03=0.06, 1*0.04=0.04 -> cummax
    reject, adjusted = holm([0.03, 0.01, 0.04, 0.02], alpha=0.05)
    np.testing.assert_allclose(adjusted, [0.06, 0.04, 0.06, 0.06])
    assert reject.tolist() == [False, True, False, False]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.5, 1.5])


def test_permutation_test_finds_a_shift_and_not_noise():
    rng = np.random.default_rng(5)
    x, y = rng.normal(1, 1, 30), rng.normal(0, 1, 30)
    assert permutation_test(x, y, n_resamples=999).p_value < 0.01
    assert permutation_test(rng.normal(0, 1, 30), y, n_resamples=999).p_value > 0.05


def test_permutation_test_of_rank_association():
    rng = np.random.default_rng(6)
    truth = np.arange(20.0)
    related = truth + rng.normal(0, 2, 20)
    res = permutation_test(related, truth, spearman, kind="pairings", alternative="greater", n_resamples=999)
    assert res.statistic > 0.8 and res.p_value < 0.01
    null_p = [
        permutation_test(
            rng.normal(size=20), truth, spearman, kind="pairings", alternative="greater", n_resamples=199, seed=s
        ).p_value
        for s in range(40)
    ]
    assert np.mean(np.array(null_p) < 0.05) <= 0.15  # ~5% false positives expected


def test_auroc_known_answers():
    assert auroc([2, 3, 4], [0, 1]).estimate == 1.0
    assert auroc([0, 1], [2, 3, 4]).estimate == 0.0
    assert auroc([1, 1], [1, 1]).estimate == 0.5  # ties count one half
    assert auroc([1, 3], [2, 0]).estimate == 0.75
    rng = np.random.default_rng(7)
    sep = auroc(rng.normal(2, 1, 60), rng.normal(0, 1, 60), n_resamples=500)
    assert 0.5 < sep.low < sep.estimate < sep.high <= 1.0
    chance = auroc(rng.normal(0, 1, 60), rng.normal(0, 1, 60), n_resamples=500)
    assert chance.low < 0.5 < chance.high


def test_verdict_three_ways():
    def iv(lo, hi):
        return Interval((lo + hi) / 2, lo, hi, 0.95, "test")

    assert verdict(iv(0.6, 0.8), 0.5) == "supported"
    assert verdict(iv(0.3, 0.45), 0.5) == "refuted"
    assert verdict(iv(0.45, 0.7), 0.5) == "inconclusive"
    assert verdict(iv(0.52, 0.58), 0.5, claim=0.6) == "supported"
    assert verdict(iv(0.48, 0.58), 0.5, claim=0.6) == "refuted"  # excludes the smallest effect that counts
    assert verdict(iv(-0.8, -0.6), 0.0, direction=-1) == "supported"
    assert verdict(iv(0.1, 0.2), 0.0, direction=-1) == "refuted"
    with pytest.raises(ValueError, match="wrong side"):
        verdict(iv(0, 1), 0.5, claim=0.4)


def test_auc_and_paired_auroc_difference():
    assert np.isnan(auc([1.0, 2.0], []))  # no negatives: no AUROC
    rng = np.random.default_rng(8)
    pos = np.stack([rng.normal(3, 1, 15), rng.normal(0, 1, 15)])
    neg = np.stack([rng.normal(0, 1, 40), rng.normal(0, 1, 40)])
    diff = auroc_difference(pos, neg, n_resamples=500)
    assert diff.estimate == pytest.approx(auc(pos[0], neg[0]) - auc(pos[1], neg[1]))
    assert 0 < diff.low < diff.estimate < diff.high
    same = auroc_difference(np.stack([pos[0], pos[0]]), np.stack([neg[0], neg[0]]), n_resamples=200)
    assert (same.low, same.high) == (0.0, 0.0)  # paired: both features resampled together
    few = auroc_difference(pos[:, :1], neg, n_resamples=200)
    assert verdict(few, 0.0) == "inconclusive"  # one positive: no interval, no verdict
    with pytest.raises(ValueError, match=r"Float\[2, n\]"):
        auroc_difference(pos[0], neg)
