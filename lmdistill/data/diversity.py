"""How varied a set of prompts is, and which prompts nearly repeat another: word n-grams.

Two prompts are near-duplicates when the Jaccard similarity of their sets of word 3-grams is at
least a threshold (0.5 by default), the overlap measure Self-Instruct (Wang et al. 2022, with
ROUGE-L) and Magpie (Xu et al. 2024) filter synthesized instructions with. distinct-n (Li et al.
2016) is the number of distinct n-grams over the number of n-grams in the whole set: 1.0 when no
n-gram repeats, near 0 for a set of templates.

Pure Python over words, no model: the same function deduplicates synthesized prompts, checks that
a held-out set shares nothing with the training prompts (a test), and measures a training set in
the report."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

NEAR_DUPLICATE = 0.5  # Jaccard on word 3-grams at or above which two prompts count as one
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """Lowercased words (letters and digits; punctuation and case do not make a prompt new)."""
    return _WORD.findall(text.lower())


def ngrams(text: str, n: int = 3) -> frozenset[tuple[str, ...]]:
    """The set of word n-grams of `text`; a text shorter than n words is one n-gram of all of it,
    so that two identical short prompts still match."""
    w = words(text)
    if len(w) < n:
        return frozenset([tuple(w)]) if w else frozenset()
    return frozenset(tuple(w[i : i + n]) for i in range(len(w) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


class NgramIndex:
    """Prompts seen so far, for asking "is this a near-duplicate of any of them?" without comparing
    against every one: an inverted index from n-gram to the prompts that hold it, so only prompts
    sharing at least one n-gram are compared."""

    def __init__(self, n: int = 3, threshold: float = NEAR_DUPLICATE) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.n, self.threshold = n, threshold
        self._sets: list[frozenset] = []
        self._texts: list[str] = []
        self._postings: dict[tuple[str, ...], list[int]] = {}

    def __len__(self) -> int:
        return len(self._sets)

    def add(self, text: str) -> None:
        grams = ngrams(text, self.n)
        index = len(self._sets)
        self._sets.append(grams)
        self._texts.append(text)
        for gram in grams:
            self._postings.setdefault(gram, []).append(index)

    def nearest(self, text: str) -> tuple[float, str | None]:
        """The highest Jaccard similarity of `text` to a prompt in the index, and that prompt."""
        grams = ngrams(text, self.n)
        candidates = {i for gram in grams for i in self._postings.get(gram, ())}
        best, best_text = 0.0, None
        for i in candidates:
            score = jaccard(grams, self._sets[i])
            if score > best:
                best, best_text = score, self._texts[i]
        return best, best_text

    def is_near_duplicate(self, text: str) -> bool:
        return self.nearest(text)[0] >= self.threshold


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct word n-grams over all word n-grams in `texts` (Li et al. 2016); 0.0 for no n-grams."""
    total, seen = 0, set()
    for text in texts:
        w = words(text)
        grams = [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


@dataclass(frozen=True)
class Diversity:
    """distinct-1/2/3 of a prompt set and the share of its prompts that nearly repeat an earlier
    one (word 3-gram Jaccard >= `threshold`)."""

    prompts: int
    distinct_1: float
    distinct_2: float
    distinct_3: float
    near_duplicate_share: float
    threshold: float = NEAR_DUPLICATE

    def line(self) -> str:
        return (
            f"{self.prompts} prompts: distinct-1 {self.distinct_1:.3f}, distinct-2 "
            f"{self.distinct_2:.3f}, distinct-3 {self.distinct_3:.3f}, near-duplicates "
            f"{self.near_duplicate_share:.1%} (word 3-gram Jaccard >= {self.threshold})"
        )


def diversity(texts: Sequence[str], threshold: float = NEAR_DUPLICATE) -> Diversity:
    """Diversity of a prompt set. A prompt counts as a near-duplicate when it nearly repeats one
    that comes before it, so a set of k copies of one prompt has share (k - 1) / k."""
    index = NgramIndex(threshold=threshold)
    repeats = 0
    for text in texts:
        if index.is_near_duplicate(text):
            repeats += 1
        index.add(text)
    return Diversity(
        prompts=len(texts),
        distinct_1=distinct_n(texts, 1),
        distinct_2=distinct_n(texts, 2),
        distinct_3=distinct_n(texts, 3),
        near_duplicate_share=repeats / len(texts) if texts else 0.0,
        threshold=threshold,
    )
