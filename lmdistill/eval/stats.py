"""Statistics for evaluation reports: pass@k, intervals for proportions and means, and the
student/teacher retention ratio with its uncertainty.

All intervals are two-sided with coverage `confidence` (default 0.95).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples of which c are correct (Chen et al. 2021,
    "Evaluating Large Language Models Trained on Code", eq. 1 and Fig. 3):

        pass@k = 1 - C(n - c, k) / C(n, k)

    computed as 1 - prod_{i = n-c+1}^{n} (1 - k / i), which never forms the huge binomials.
    When fewer than k samples are wrong (n - c < k), every k-subset holds a correct one: 1.0.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(samples: Sequence[tuple[int, int]], k: int) -> float:
    """pass@k averaged over problems, each given as (n, c)."""
    if not samples:
        raise ValueError("no problems")
    return sum(pass_at_k(n, c, k) for n, c in samples) / len(samples)


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval for a binomial proportion (Wilson 1927; recommended over the normal
    approximation by Brown, Cai & DasGupta 2001, which undercovers near 0 and 1 and for small n):

        (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n),   p = successes / n
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    z = _z(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 and n successes the bound is exactly 0 (or 1); the subtraction leaves round-off.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return Interval(p, low, high)


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1 - confidence) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return float(low), float(high)


def bootstrap_mean_interval(
    scores: Sequence[float], *, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> Interval:
    """Percentile bootstrap interval (Efron & Tibshirani 1993, ch. 13) for the mean of
    per-example scores: resample examples with replacement, take the mean each time, and report
    the (1-confidence)/2 and (1+confidence)/2 quantiles. Deterministic for a seed."""
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("scores must be a non-empty 1-D sequence")
    _z(confidence)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_resamples, x.size))
    means = x[idx].mean(axis=1)
    return Interval(float(x.mean()), *_percentiles(means, confidence))


def retention_interval(
    student: Sequence[float],
    teacher: Sequence[float],
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """Retention = mean(student) / mean(teacher) over the same examples, with a paired
    percentile-bootstrap interval: each resample draws examples (not scores) with replacement and
    uses both models' scores on them, so the correlation between the two (both find the same
    examples hard) narrows the interval as it should.

    Resamples whose teacher mean is 0 have no ratio and are dropped; raises ValueError when the
    teacher scores 0 on everything.
    """
    s = np.asarray(student, dtype=np.float64)
    t = np.asarray(teacher, dtype=np.float64)
    if s.shape != t.shape or s.ndim != 1 or s.size == 0:
        raise ValueError(
            f"student and teacher need the same non-zero number of scores, got {s.size} and {t.size}"
        )
    if t.mean() == 0:
        raise ValueError("the teacher scores 0 on every example: retention is undefined")
    _z(confidence)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, s.size, size=(n_resamples, s.size))
    s_means, t_means = s[idx].mean(axis=1), t[idx].mean(axis=1)
    keep = t_means > 0
    ratios = s_means[keep] / t_means[keep]
    return Interval(float(s.mean() / t.mean()), *_percentiles(ratios, confidence))


def _token_counts(
    x: np.ndarray, y: np.ndarray, a_tokens, b_tokens, confidence: float
) -> tuple[np.ndarray, np.ndarray]:
    """The token counts of the paired scores x and y (ones when not given: a plain mean),
    checked to match them and to be positive in total; `confidence` is checked too."""
    _z(confidence)
    tx = np.ones_like(x) if a_tokens is None else np.asarray(a_tokens, dtype=np.float64)
    ty = np.ones_like(y) if b_tokens is None else np.asarray(b_tokens, dtype=np.float64)
    if tx.shape != x.shape or ty.shape != y.shape:
        raise ValueError("token counts need one entry per score")
    if tx.sum() <= 0 or ty.sum() <= 0:
        raise ValueError("no tokens: the ratio is undefined")
    return tx, ty


def paired_difference_interval(
    a: Sequence[float],
    b: Sequence[float],
    *,
    a_tokens: Sequence[float] | None = None,
    b_tokens: Sequence[float] | None = None,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """Model A minus model B on the same examples, with a paired percentile-bootstrap interval:
    each resample draws examples with replacement and scores both models on them, so what the
    two share (the same hard examples) cancels out of the interval.

    a, b: per-example scores, in the same example order. Without `*_tokens` the metric is the mean
    of the scores; with them it is the ratio sum(scores) / sum(tokens) (a per-token metric such as
    KL, whose per-example values are sums over that example's tokens). Resamples with no tokens
    are dropped."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError(f"a and b need the same non-zero number of scores, got {x.size}, {y.size}")
    tx, ty = _token_counts(x, y, a_tokens, b_tokens, confidence)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_resamples, x.size))
    dx, dy = tx[idx].sum(axis=1), ty[idx].sum(axis=1)
    keep = (dx > 0) & (dy > 0)
    diffs = x[idx][keep].sum(axis=1) / dx[keep] - y[idx][keep].sum(axis=1) / dy[keep]
    estimate = x.sum() / tx.sum() - y.sum() / ty.sum()
    return Interval(float(estimate), *_percentiles(diffs, confidence))


def pooled_paired_difference_interval(
    a: Sequence[Sequence[float]],
    b: Sequence[Sequence[float]],
    *,
    a_tokens: Sequence[Sequence[float]] | None = None,
    b_tokens: Sequence[Sequence[float]] | None = None,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """Method A minus method B over several training seeds and the same examples, with a
    two-way paired percentile bootstrap: each resample draws seeds with replacement AND examples
    with replacement (the same examples for every drawn seed), and scores both methods on the
    drawn (seed, example) cells. Resampling seeds puts the seed-to-seed spread of the difference
    into the interval, so a claim that A beats B does not rest on one lucky seed; resampling
    examples keeps the pairing (both methods, the same hard examples).

    a, b: (seeds, examples) per-example scores, row s of both from training seed s, columns in
    the same example order. Without `*_tokens` the metric is the mean over the cells; with them
    it is sum(scores) / sum(tokens) over the cells (per-token metrics such as KL or top-1
    agreement, whose per-example values are sums over that example's tokens)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2 or x.size == 0:
        raise ValueError(
            f"a and b need the same non-empty (seeds, examples) shape, got {x.shape}, {y.shape}"
        )
    tx, ty = _token_counts(x, y, a_tokens, b_tokens, confidence)
    seeds, examples = x.shape
    rng = np.random.default_rng(seed)
    s_idx = rng.integers(0, seeds, size=(n_resamples, seeds))[:, :, None]
    e_idx = rng.integers(0, examples, size=(n_resamples, examples))[:, None, :]

    def ratio(values: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        return values[s_idx, e_idx].sum(axis=(1, 2)), tokens[s_idx, e_idx].sum(axis=(1, 2))

    (nx, dx), (ny, dy) = ratio(x, tx), ratio(y, ty)
    keep = (dx > 0) & (dy > 0)
    diffs = nx[keep] / dx[keep] - ny[keep] / dy[keep]
    estimate = x.sum() / tx.sum() - y.sum() / ty.sum()
    return Interval(float(estimate), *_percentiles(diffs, confidence))
