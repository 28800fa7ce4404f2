"""The token cache (lmdistill.data.tokens) and flat packing plans: the cached data path gives the
examples and the batches the in-memory one gave, tokenizes once, and is keyed by what decides the
ids (issue 13, item 3)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny import make_tokenizer

from lmdistill.data import sft
from lmdistill.data.records import iter_records
from lmdistill.data.sft import (
    SpanWeights,
    collate,
    conversation,
    encode,
    epoch_plan,
    load_examples,
    record_answer_start,
)

QUESTIONS = ["What is 2 + 3?", "Hello world!", "Explain photosynthesis in one sentence, please."]
WEIGHTS = SpanWeights(reasoning=1.0, answer=2.0)  # no answer_start: weights None


def write_data(path: Path, n: int = 24) -> Path:
    records = []
    for i in range(n):
        response = "The answer is 5. " * (1 + i % 5) + f"Answer: {i}"
        record = {
            "prompt": QUESTIONS[i % 3],
            "response": response,
            "split": "test" if i % 7 == 3 else "train",
        }
        if i % 2:
            record["answer_start"] = response.index("Answer:")
        records.append(record)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def in_memory(path: Path, tokenizer, *, max_length: int, split=None, span_weights=None):
    """The data path before the token cache: every record encoded into a list."""
    out = []
    for index, (line, record) in enumerate(iter_records(path)):
        if split is not None and record.get("split") != split:
            continue
        messages = conversation(record, path, line)
        start = record_answer_start(record, messages, path, line) if span_weights else None
        example = encode(
            tokenizer,
            messages,
            max_length=max_length,
            index=index,
            span_weights=span_weights,
            answer_start=start,
        )
        if example is not None:
            out.append(example)
    return out


@pytest.mark.parametrize(
    "settings",
    [
        dict(max_length=512),
        dict(max_length=24),  # some records lose every target: skipped, indices kept
        dict(max_length=512, split="train", span_weights=WEIGHTS),
    ],
)
def test_the_cached_path_gives_the_in_memory_examples_and_batches(tmp_path: Path, settings):
    path, tokenizer = write_data(tmp_path / "d.jsonl"), make_tokenizer()
    reference = in_memory(path, tokenizer, **settings)
    data = load_examples(path, tokenizer, **settings)
    assert list(data.examples) == reference  # ids, targets, record index and weights (or None)
    assert data.examples.lengths.tolist() == [len(e) for e in reference]
    if settings.get("span_weights"):
        assert any(e.weights is None for e in reference) and any(e.weights for e in reference)
    plan = epoch_plan(data.examples.lengths, seed=1, epoch=0, row_length=512, tokens_per_batch=600)
    for micro_batch in plan:
        cached, listed = collate(data.examples, micro_batch, 0), collate(reference, micro_batch, 0)
        for field in ("input_ids", "position_ids", "targets", "real", "weights"):
            a, b = getattr(cached, field), getattr(listed, field)
            assert (a is None and b is None) or bool((a == b).all()), field


def test_a_second_load_reads_the_cache_and_tokenizes_nothing(tmp_path: Path, monkeypatch):
    path, tokenizer = write_data(tmp_path / "d.jsonl"), make_tokenizer()
    first = load_examples(path, tokenizer, max_length=64)

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(sft, "encode", no_tokenizing)
    again = load_examples(path, tokenizer, max_length=64)
    assert again.examples.arrays.dir == first.examples.arrays.dir
    assert list(again.examples) == list(first.examples)
    assert (again.records, again.skipped, again.filtered) == (24, first.skipped, 0)


def test_another_tokenizer_data_or_max_length_gets_its_own_cache(tmp_path: Path):
    path, tokenizer = write_data(tmp_path / "d.jsonl"), make_tokenizer()
    base = load_examples(path, tokenizer, max_length=64).examples
    other_vocab = load_examples(path, make_tokenizer(vocab_size=320), max_length=64).examples
    templated = make_tokenizer()
    templated.chat_template = "{{ bos_token or '' }}" + templated.chat_template
    other_template = load_examples(path, templated, max_length=64).examples
    shorter = load_examples(path, tokenizer, max_length=32).examples
    dirs = {e.arrays.dir for e in (base, other_vocab, other_template, shorter)}
    assert len(dirs) == 4
    # and each holds what its settings give, not a stale copy of another's
    assert list(other_vocab) == in_memory(path, make_tokenizer(vocab_size=320), max_length=64)
    assert list(shorter) == in_memory(path, tokenizer, max_length=32)
    assert max(len(e) for e in shorter) <= 32 < max(len(e) for e in base)
    # changed data: a new cache with the new records
    path.write_text(path.read_text().replace("Hello world!", "Hello there!"))
    changed = load_examples(path, tokenizer, max_length=64).examples
    assert changed.arrays.dir not in dirs
    assert list(changed) == in_memory(path, tokenizer, max_length=64)


def test_a_bad_record_leaves_no_cache_and_is_reported_again(tmp_path: Path):
    path = write_data(tmp_path / "d.jsonl", n=3)
    path.write_text(path.read_text() + '{"prompt": 5, "response": "x"}\n')
    for _ in range(2):
        with pytest.raises(Exception, match=r"d.jsonl:4"):
            load_examples(path, make_tokenizer(), max_length=64)


def test_by_record_gives_none_for_records_without_an_example(tmp_path: Path):
    path, tokenizer = write_data(tmp_path / "d.jsonl"), make_tokenizer()
    data = load_examples(path, tokenizer, max_length=512, split="train")
    by_record = data.examples.by_record()
    assert len(by_record) == 24
    held = [i for i in range(24) if i % 7 == 3]
    assert all(by_record[i] is None and i not in by_record for i in held)
    assert list(by_record) == [e.index for e in data.examples]
    assert [e.index for e in by_record[0:5] if e is not None] == [0, 1, 2, 4]


# ----------------------------------------------------------------------------------- plans
def reference_plan(lengths, *, seed, epoch, row_length, tokens_per_batch, packing=True):
    """The list-based packing this module had before flat plans (first fit in a window of 64 rows,
    then rows grouped under the padded token budget), kept as the reference."""
    order = np.random.default_rng([seed, epoch]).permutation(len(lengths)).tolist()
    rows, free, first_open = [], [], 0
    if not packing:
        rows = [[i] for i in order]
    for i in order if packing else ():
        n = lengths[i]
        window = range(max(first_open, len(rows) - 64), len(rows))
        target = next((r for r in window if free[r] >= n), None)
        if target is None:
            rows.append([])
            free.append(row_length)
            target = len(rows) - 1
        rows[target].append(i)
        free[target] -= n
        while first_open < len(rows) and free[first_open] == 0:
            first_open += 1
    batches, current, longest = [], [], 0
    for row in rows:
        size = sum(lengths[i] for i in row)
        if current and (len(current) + 1) * max(longest, size) > tokens_per_batch:
            batches.append(current)
            current, longest = [], 0
        current.append(row)
        longest = max(longest, size)
    return batches + ([current] if current else [])


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_flat_plans_are_the_list_plans(seed: int, packing: bool):
    rng = np.random.default_rng(seed)
    # short and long examples, some exactly filling a row (so first_open moves)
    lengths = np.concatenate([rng.integers(1, 40, 3000), rng.integers(100, 257, 500), [256] * 50])
    lengths = rng.permutation(lengths).tolist()
    settings = dict(seed=seed, epoch=seed + 1, row_length=256, tokens_per_batch=1024)
    plan = epoch_plan(lengths, packing=packing, **settings)
    expected = reference_plan(lengths, packing=packing, **settings)
    assert len(plan) == len(expected)
    assert plan == expected
    assert plan[-1] == expected[-1] and plan[1:3] == expected[1:3]
