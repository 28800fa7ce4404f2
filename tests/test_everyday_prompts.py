"""The shipped everyday prompt sets (scripts/make_everyday_prompts.py, issue #21): the held-out
one shares no near-duplicate with anything a student trains on, checked here by brute force over
every pair (word 3-gram Jaccard, independent of the index the synthesis used)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmdistill.data.diversity import NEAR_DUPLICATE, jaccard, ngrams

ASSETS = Path(__file__).resolve().parents[1] / "lmdistill" / "assets"


def _records(name: str) -> list[dict]:
    return [json.loads(line) for line in (ASSETS / name).read_text().splitlines()]


def _trained_on() -> list[str]:
    """Every prompt a quickstart or bench student can train on: the bundled set's train split,
    the extra file's (it has none today), and the synthesized training requests."""
    rows = _records("prompts.jsonl") + _records("prompts_extra_test.jsonl")
    return [r["prompt"] for r in rows if r["split"] == "train"] + [
        r["prompt"] for r in _records("everyday_train.jsonl")
    ]


def test_the_everyday_held_out_set_repeats_nothing_trained_on() -> None:
    held_out = [r["prompt"] for r in _records("everyday_test.jsonl")]
    trained = [ngrams(t) for t in _trained_on()]
    worst = max(((jaccard(ngrams(h), t), h) for h in held_out for t in trained), key=lambda x: x[0])
    assert worst[0] < NEAR_DUPLICATE, worst


@pytest.mark.parametrize("name", ["everyday_train.jsonl", "everyday_test.jsonl"])
def test_each_everyday_set_is_free_of_near_duplicates_and_well_formed(name: str) -> None:
    rows = _records(name)
    split = "train" if "train" in name else "test"
    assert len(rows) >= 35
    assert all(r["split"] == split and r["prompt"].strip() for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    grams = [ngrams(r["prompt"]) for r in rows]
    for i in range(len(grams)):
        for j in range(i + 1, len(grams)):
            assert jaccard(grams[i], grams[j]) < NEAR_DUPLICATE, (rows[i], rows[j])
