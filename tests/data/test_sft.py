"""Chat rendering, assistant-only targets, truncation and packing (lmdistill.data.sft)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tiny import make_tiny_model, make_tokenizer

from lmdistill.data.sft import (
    IGNORE_INDEX,
    check_packing,
    collate,
    conversation,
    encode,
    epoch_plan,
    group_rows,
    load_examples,
    pack_rows,
)
from lmdistill.errors import InputError, UserError
from lmdistill.teachers.forward import forward_signals

MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "The answer is 5."},
    {"role": "user", "content": "And 7 * 6?"},
    {"role": "assistant", "content": "42"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example.targets if t != IGNORE_INDEX])


def test_targets_are_the_assistant_turns_and_their_end_of_turn_only(tokenizer):
    example = encode(tokenizer, MULTI_TURN, max_length=512, index=0)
    assert trained_text(tokenizer, example) == "The answer is 5.<|im_end|>42<|im_end|>"


def test_targets_are_next_tokens_aligned_within_the_example(tokenizer):
    example = encode(tokenizer, MULTI_TURN, max_length=512, index=0)
    for t, target in enumerate(example.targets):
        if target != IGNORE_INDEX:
            assert target == example.input_ids[t + 1]
    assert example.targets[-1] == IGNORE_INDEX  # nothing to predict after the last token


def test_the_prompt_is_rendered_with_the_chat_template(tokenizer):
    example = encode(tokenizer, MULTI_TURN[:3], max_length=512, index=0)
    rendered = tokenizer.apply_chat_template(MULTI_TURN[:3], tokenize=False)
    assert tokenizer.decode(example.input_ids) == rendered


def test_generate_records_and_chat_records_give_the_same_example(tokenizer):
    generated = {"messages": MULTI_TURN[1:2], "response": "The answer is 5."}
    chat = {"messages": MULTI_TURN[1:3]}
    a = encode(tokenizer, conversation(generated, "x.jsonl", 1), max_length=512, index=0)
    b = encode(tokenizer, conversation(chat, "x.jsonl", 1), max_length=512, index=0)
    assert a == b


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "messages"),
        ({"messages": [{"role": "user", "content": 3}], "response": "x"}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "hi"}], "response": 5}, "response"),
        ({"messages": MULTI_TURN, "response": "again"}, "response"),
    ],
)
def test_bad_records_name_file_line_and_field(record, field):
    with pytest.raises(InputError, match=re.escape(f"data.jsonl:7: field '{field}'")):
        conversation(record, "data.jsonl", 7)


def test_truncation_cuts_the_end_and_drops_examples_without_targets(tokenizer):
    full = encode(tokenizer, MULTI_TURN, max_length=512, index=0)
    cut = encode(tokenizer, MULTI_TURN, max_length=len(full) - 6, index=0)
    assert cut.input_ids == full.input_ids[: len(full) - 6]
    assert cut.targets[:-1] == full.targets[: len(full) - 7] and cut.targets[-1] == IGNORE_INDEX
    prompt_only = len(encode(tokenizer, MULTI_TURN[:3], max_length=512, index=0)) - 8
    assert encode(tokenizer, MULTI_TURN[:3], max_length=prompt_only, index=0) is None


def test_load_examples_keeps_record_indices_and_filters_by_split(tokenizer, tmp_path: Path):
    records = [
        {"messages": MULTI_TURN[1:2], "response": "five", "split": "train"},
        {"messages": MULTI_TURN[1:2], "response": "five", "split": "test"},
        {"messages": MULTI_TURN[1:2], "response": "five", "split": "train"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = load_examples(path, tokenizer, max_length=64, split="train")
    assert [e.index for e in data.examples] == [0, 2]  # the cache keys rows by record index
    assert data.filtered == 1


def test_pack_rows_places_every_example_once_within_the_row_length():
    lengths = [5, 9, 3, 7, 10, 1, 4, 8, 6, 2]
    rows = pack_rows(lengths, range(len(lengths)), row_length=12)
    placed = sorted(i for row in rows for i in row)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 12 for row in rows)
    # First fit goes back to earlier rows: three rows of 8 + 4 where filling only the newest row
    # (next fit) would need four.
    assert pack_rows([8, 8, 8, 4, 4, 4], range(6), row_length=12) == [[0, 3], [1, 4], [2, 5]]


def test_group_rows_respects_the_padded_token_budget():
    lengths = [6] * 10
    rows = [[i] for i in range(10)]
    batches = group_rows(rows, lengths, tokens_per_batch=20)
    assert all(len(b) * 6 <= 20 for b in batches)
    assert [i for b in batches for row in b for i in row] == list(range(10))


def test_epoch_plans_are_deterministic_and_reshuffled_per_epoch():
    lengths = list(range(1, 40))
    kwargs = dict(seed=3, row_length=64, tokens_per_batch=128)
    assert epoch_plan(lengths, epoch=0, **kwargs) == epoch_plan(lengths, epoch=0, **kwargs)
    assert epoch_plan(lengths, epoch=0, **kwargs) != epoch_plan(lengths, epoch=1, **kwargs)


def _three_examples(tokenizer):
    turns = [
        [
            {"role": "user", "content": "Hello world!"},
            {"role": "assistant", "content": "How are you today?"},
        ],
        [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
        [
            {"role": "user", "content": "capital of Japan"},
            {"role": "assistant", "content": "Tokyo."},
        ],
    ]
    return [encode(tokenizer, t, max_length=64, index=i) for i, t in enumerate(turns)]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_packed_row_gives_each_example_its_own_logits(tokenizer, attention):
    model = make_tiny_model(tokenizer, seed=0)
    model.config._attn_implementation = attention
    examples = _three_examples(tokenizer)
    # Two rows, the first packing examples 0 and 1, the second holding example 2 plus padding.
    batch = collate(examples, [[0, 1], [2]], pad_id=tokenizer.pad_token_id)
    assert batch.position_ids[0].tolist()[: len(examples[0]) + 1] == [*range(len(examples[0])), 0]
    with torch.no_grad():
        packed = forward_signals(model, batch)
        head = packed.head
        starts = {0: (0, 0), 1: (0, len(examples[0])), 2: (1, 0)}
        for i, (row, start) in starts.items():
            alone = collate(examples, [[i]], pad_id=tokenizer.pad_token_id)
            expected = forward_signals(model, alone).hidden[0] @ head.T
            got = packed.hidden[row, start : start + len(examples[i])] @ head.T
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_packed_targets_never_cross_examples(tokenizer):
    examples = _three_examples(tokenizer)
    batch = collate(examples, [[0, 1, 2]], pad_id=tokenizer.pad_token_id)
    ends = torch.tensor([len(e) for e in examples]).cumsum(0) - 1
    assert (batch.targets[0, ends] == IGNORE_INDEX).all()
    assert batch.loss_tokens == sum(e.loss_tokens for e in examples)
    assert batch.tokens == sum(len(e) for e in examples)


def test_check_packing_passes_on_a_llama_and_fails_when_packing_is_ignored(tokenizer, monkeypatch):
    import transformers.masking_utils as masking_utils

    model = make_tiny_model(tokenizer, seed=0)
    check_packing(model)
    # Simulate a transformers version that does not derive the mask from position_ids.
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(UserError, match="packed examples attend to each other"):
        check_packing(model)
