"""Word n-gram overlap and diversity (`lmdistill.data.diversity`): against brute force and hand
counts, and the properties a deduplicator needs."""

from __future__ import annotations

import itertools
import random

import pytest

from lmdistill.data.diversity import NgramIndex, distinct_n, diversity, jaccard, ngrams, words


def test_words_ignore_case_and_punctuation() -> None:
    assert (
        words("How do I boil an egg?")
        == words("how do i BOIL an egg")
        == [
            "how",
            "do",
            "i",
            "boil",
            "an",
            "egg",
        ]
    )


def test_jaccard_is_one_for_identical_zero_for_disjoint_and_symmetric() -> None:
    a, b = ngrams("write a short poem about the sea"), ngrams("how do I fix a flat tyre")
    assert jaccard(a, a) == 1.0
    assert jaccard(a, b) == 0.0
    c = ngrams("write a short poem about the moon")
    assert jaccard(a, c) == jaccard(c, a) == pytest.approx(4 / 6)  # 5 trigrams each, 4 shared


def test_distinct_n_matches_a_hand_count() -> None:
    texts = ["a b a b", "a b c"]
    # unigrams: a b a b a b c -> 3 distinct of 7; bigrams: ab ba ab ab bc -> 3 of 5
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert distinct_n([], 2) == 0.0


def test_the_index_finds_the_same_nearest_prompt_as_comparing_every_pair() -> None:
    rng = random.Random(0)
    vocab = [
        "tips",
        "for",
        "how",
        "do",
        "i",
        "write",
        "a",
        "poem",
        "note",
        "about",
        "the",
        "sea",
        "cat",
        "garden",
        "bread",
    ]
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(2, 9))) for _ in range(80)]
    index = NgramIndex()
    for i, text in enumerate(texts):
        brute = max((jaccard(ngrams(text), ngrams(t)) for t in texts[:i]), default=0.0)
        assert index.nearest(text)[0] == pytest.approx(brute)
        index.add(text)


def test_near_duplicate_share_of_k_copies_is_k_minus_one_over_k() -> None:
    prompts = ["Give me three tips for sleeping better."] * 4 + [
        "Write a haiku about autumn leaves falling.",
        "What is the difference between a lake and a pond?",
    ]
    d = diversity(prompts)
    assert d.prompts == 6
    assert d.near_duplicate_share == pytest.approx(3 / 6)
    assert diversity(prompts[3:]).near_duplicate_share == 0.0


def test_templates_score_lower_distinct_n_than_varied_requests() -> None:
    templated = [f"What is the capital of {c}?" for c in ("France", "Japan", "Peru", "Chile")]
    varied = [
        "How do I boil an egg?",
        "Write a haiku about rain.",
        "Compare tea and coffee for mornings.",
        "Give me tips for a job interview.",
    ]
    for n in (1, 2, 3):
        assert distinct_n(templated, n) < distinct_n(varied, n)


@pytest.mark.parametrize("a,b", list(itertools.combinations(["x y z", "x y z w", "w z y x"], 2)))
def test_jaccard_stays_in_the_unit_interval(a: str, b: str) -> None:
    assert 0.0 <= jaccard(ngrams(a), ngrams(b)) <= 1.0
