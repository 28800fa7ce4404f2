"""ROUGE-L against values computed by hand (Lin 2004's own examples among them) and LCS against
brute force."""

import itertools
import random

import pytest

from lmdistill.eval.rouge import lcs_length, rouge_l, tokenize


def brute_force_lcs(a: list[str], b: list[str]) -> int:
    """The longest subsequence of `a` that is also a subsequence of `b`, by trying them all."""

    def is_subsequence(sub: tuple[str, ...], seq: list[str]) -> bool:
        it = iter(seq)
        return all(x in it for x in sub)

    for size in range(min(len(a), len(b)), 0, -1):
        if any(is_subsequence(c, b) for c in itertools.combinations(a, size)):
            return size
    return 0


def test_lin_2004_examples():
    # Lin 2004, sec. 3.1: reference S1, candidates S2 and S3; ROUGE-L(S2) = 3/4, ROUGE-L(S3) = 2/4.
    reference = "police killed the gunman"
    assert rouge_l("police kill the gunman", reference).f == pytest.approx(0.75)
    assert rouge_l("the gunman kill police", reference).f == pytest.approx(0.5)


def test_precision_recall_and_f_by_hand():
    score = rouge_l("the cat sat on the mat", "the cat is on the mat")  # LCS 5 of 6 and 6
    assert (score.precision, score.recall, score.f) == pytest.approx((5 / 6, 5 / 6, 5 / 6))
    score = rouge_l("a b c d", "a c")  # LCS 2: P = 2/4, R = 2/2, F1 = 2PR/(P+R) = 2/3
    assert (score.precision, score.recall, score.f) == pytest.approx((0.5, 1.0, 2 / 3))


def test_beta_weights_recall():
    # F_beta = (1 + b^2) P R / (R + b^2 P) with P = 0.5, R = 1, b = 2: 5 * 0.5 / 3.
    assert rouge_l("a b c d", "a c", beta=2.0).f == pytest.approx(2.5 / 3)


def test_tokens_ignore_case_and_punctuation():
    assert tokenize("It's 3.5 km, Ölberg!") == ["it", "s", "3", "5", "km", "ölberg"]
    assert rouge_l("Hello, World!", "hello world").f == 1.0


def test_empty_sides():
    assert rouge_l("", "something").f == 0.0
    assert rouge_l("something", "").f == 0.0
    assert rouge_l("...", "!!!").f == 1.0  # neither has a token: the response reproduces it
    assert rouge_l("x y", "z").f == 0.0


def test_lcs_matches_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abcd") for _ in range(rng.randint(0, 7))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 7))]
        assert lcs_length(a, b) == brute_force_lcs(a, b) == lcs_length(b, a), (a, b)
