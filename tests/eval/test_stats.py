import math

import numpy as np
import pytest

from lmdistill.eval.stats import (
    bootstrap_mean_interval,
    mean_pass_at_k,
    paired_difference_interval,
    pass_at_k,
    pooled_paired_difference_interval,
    retention_interval,
    wilson_interval,
)


def closed_form_pass_at_k(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_matches_closed_form_on_every_small_case():
    for n in range(1, 31):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(
                    closed_form_pass_at_k(n, c, k), abs=1e-12
                ), (n, c, k)


@pytest.mark.parametrize(
    ("n", "c", "k"), [(200, 3, 10), (200, 150, 100), (1000, 1, 1), (500, 37, 50)]
)
def test_pass_at_k_matches_closed_form_on_large_n(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(closed_form_pass_at_k(n, c, k), rel=1e-9)


def test_pass_at_k_edge_cases():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 10, 3) == 1.0
    assert pass_at_k(10, 8, 3) == 1.0  # n - c = 2 < k: every 3-subset holds a correct sample
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct


@pytest.mark.parametrize(("n", "c", "k"), [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_mean_pass_at_k_averages_problems():
    assert mean_pass_at_k([(10, 0), (10, 10)], k=1) == pytest.approx(0.5)


def test_wilson_matches_hand_computation():
    # 8 of 10 at 95%: z = 1.959964, p = 0.8,
    # centre = (p + z²/20) / (1 + z²/10) = 0.99207 / 1.38415 = 0.716735
    # half = z * sqrt(p(1-p)/10 + z²/400) / (1 + z²/10) = 0.226568
    ci = wilson_interval(8, 10)
    assert ci.estimate == 0.8
    assert ci.low == pytest.approx(0.490162, abs=1e-5)
    assert ci.high == pytest.approx(0.943318, abs=1e-5)


def test_wilson_stays_in_unit_interval_and_narrows_with_n():
    assert wilson_interval(0, 20).low == 0.0
    assert wilson_interval(20, 20).high == 1.0
    assert wilson_interval(0, 20).high > 0  # unlike the normal approximation, not degenerate
    small, large = wilson_interval(5, 10), wilson_interval(500, 1000)
    assert large.high - large.low < small.high - small.low
    assert wilson_interval(5, 10, confidence=0.99).low < small.low


def test_bootstrap_is_seeded_and_sensible():
    rng = np.random.default_rng(1)
    scores = rng.random(300).round().tolist()
    a = bootstrap_mean_interval(scores, seed=3)
    assert a == bootstrap_mean_interval(scores, seed=3)
    assert a != bootstrap_mean_interval(scores, seed=4)
    assert a.low < a.estimate < a.high
    # Close to the normal-theory interval for a large sample.
    se = np.std(scores) / math.sqrt(len(scores))
    assert a.high - a.low == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_bootstrap_of_constant_scores_has_no_width():
    ci = bootstrap_mean_interval([1.0] * 50)
    assert (ci.estimate, ci.low, ci.high) == (1.0, 1.0, 1.0)


def test_retention_of_identical_scores_is_exactly_one():
    scores = np.random.default_rng(0).random(100).tolist()
    ci = retention_interval(scores, scores)
    # Paired resampling: every resample's ratio is exactly 1.
    assert (ci.estimate, ci.low, ci.high) == pytest.approx((1.0, 1.0, 1.0))


def test_retention_pairs_examples():
    rng = np.random.default_rng(0)
    teacher = rng.random(200)
    student = 0.5 * teacher  # keeps half on every example
    ci = retention_interval(student.tolist(), teacher.tolist())
    assert ci.low == pytest.approx(0.5) and ci.high == pytest.approx(0.5)
    noisy = retention_interval(rng.permutation(student).tolist(), teacher.tolist())
    assert noisy.high - noisy.low > 0.01  # unpaired, the same scores give a wide interval


def test_retention_rejects_mismatched_or_zero_teacher():
    with pytest.raises(ValueError):
        retention_interval([1.0, 0.0], [1.0])
    with pytest.raises(ValueError):
        retention_interval([1.0, 0.0], [0.0, 0.0])


# ---------------------------------------------------------------- pooled over seeds


def test_pooled_interval_with_one_seed_is_the_paired_interval():
    rng = np.random.default_rng(1)
    a, b = rng.random(50), rng.random(50)
    pooled = pooled_paired_difference_interval([a], [b], seed=3)
    single = paired_difference_interval(a, b, seed=3)
    assert pooled.estimate == pytest.approx(single.estimate)
    # One seed: every resample draws it, so only the example draws vary, as in the 1-D version.
    assert pooled.low == pytest.approx(single.low, abs=0.02)
    assert pooled.high == pytest.approx(single.high, abs=0.02)


def test_pooled_interval_excludes_zero_for_a_consistent_gain_and_not_for_a_flipping_one():
    rng = np.random.default_rng(0)
    base = rng.random((3, 200))
    noise = rng.normal(0, 0.05, size=(3, 200))
    consistent = pooled_paired_difference_interval(base + 0.05 + noise, base)
    assert consistent.low > 0 and consistent.estimate == pytest.approx(0.05, abs=0.01)
    # Two seeds ahead by 0.05, one behind by 0.1: the pooled mean is 0, and resampling seeds
    # must keep the interval around it wide enough to hold 0.
    shift = np.array([[0.05], [0.05], [-0.1]])
    flipping = pooled_paired_difference_interval(base + shift + noise, base)
    assert flipping.low < 0 < flipping.high


def test_pooled_interval_of_token_ratios_is_the_ratio_of_sums():
    x = [[1.0, 3.0], [2.0, 2.0]]
    t = [[2.0, 4.0], [4.0, 2.0]]
    y = [[0.0, 1.0], [1.0, 1.0]]
    got = pooled_paired_difference_interval(x, y, a_tokens=t, b_tokens=t)
    assert got.estimate == pytest.approx(8 / 12 - 3 / 12)


def test_pooled_interval_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="seeds, examples"):
        pooled_paired_difference_interval([[1.0, 2.0]], [[1.0]])
