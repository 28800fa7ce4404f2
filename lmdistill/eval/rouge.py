"""ROUGE-L (Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries", sec. 3): how much
of a reference a response reproduces in order, from the longest common subsequence (LCS) of
their tokens. MiniLLM (Gu et al. 2024) and DistiLLM (Ko et al. 2024) report it for the greedy
responses of instruction-following students.

    R = LCS / len(reference)      P = LCS / len(response)      F = (1 + b²) R P / (R + b² P)

with b = 1 (the F1 that Google's rouge-score package and those papers report). Tokens: maximal
runs of letters and digits, lower-cased (rouge-score's tokenizer does the same for ASCII; this one
also keeps non-ASCII letters). No stemming.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_TOKEN = re.compile(r"[^\W_]+")


def tokenize(text: str) -> list[str]:
    """Lower-cased runs of letters and digits: "It's 3.5 km!" -> ["it", "s", "3", "5", "km"]."""
    return _TOKEN.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, by dynamic programming in O(len(a) len(b))
    time and O(len(b)) memory."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            current[j] = previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1])
        previous = current
    return previous[-1]


@dataclass(frozen=True)
class RougeL:
    precision: float
    recall: float
    f: float


def rouge_l(response: str, reference: str, *, beta: float = 1.0) -> RougeL:
    """ROUGE-L of `response` against `reference` (see the module docstring). Both without
    tokens: a perfect match (1.0); only one: 0.0."""
    candidate, target = tokenize(response), tokenize(reference)
    if not candidate and not target:
        return RougeL(1.0, 1.0, 1.0)
    if not candidate or not target:
        return RougeL(0.0, 0.0, 0.0)
    lcs = lcs_length(candidate, target)
    if lcs == 0:
        return RougeL(0.0, 0.0, 0.0)
    precision, recall = lcs / len(candidate), lcs / len(target)
    f = (1 + beta**2) * precision * recall / (recall + beta**2 * precision)
    return RougeL(precision, recall, f)
