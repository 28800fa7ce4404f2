"""Per-span loss weights: reasoning vs final-answer tokens (data.span_weights, issue #5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import make_tokenizer

from lmdistill.data.sft import IGNORE_INDEX, SpanWeights, collate, encode, load_examples
from lmdistill.errors import InputError, UserError

PROMPT = [{"role": "user", "content": "What is 2 + 3?"}]
RESPONSE = "2 plus 3 makes 5.\nThe answer is 5."
ANSWER_START = RESPONSE.index("The answer")
WEIGHTS = SpanWeights(reasoning=0.5, answer=2.0)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def chat(response: str = RESPONSE) -> list[dict]:
    return [*PROMPT, {"role": "assistant", "content": response}]


def text_weighted(tokenizer, example, weight: float) -> str:
    """The target tokens whose position has `weight`, decoded."""
    return tokenizer.decode(
        [
            t
            for t, w in zip(example.targets, example.weights, strict=True)
            if t != IGNORE_INDEX and w == weight
        ]
    )


def test_answer_tokens_start_at_answer_start_and_the_rest_is_reasoning(tokenizer):
    example = encode(
        tokenizer,
        chat(),
        max_length=512,
        index=0,
        span_weights=WEIGHTS,
        answer_start=ANSWER_START,
    )
    assert text_weighted(tokenizer, example, 2.0) == "The answer is 5.<|im_end|>"
    assert text_weighted(tokenizer, example, 0.5) == "2 plus 3 makes 5.\n"
    no_target = [
        w for t, w in zip(example.targets, example.weights, strict=True) if t == IGNORE_INDEX
    ]
    assert set(no_target) == {1.0}
    plain = encode(tokenizer, chat(), max_length=512, index=0)
    assert (plain.input_ids, plain.targets) == (example.input_ids, example.targets)


def test_earlier_assistant_turns_are_reasoning(tokenizer):
    messages = [*chat("Five."), {"role": "user", "content": "Sure?"}, *chat()[1:]]
    example = encode(
        tokenizer,
        messages,
        max_length=512,
        index=0,
        span_weights=WEIGHTS,
        answer_start=ANSWER_START,
    )
    assert text_weighted(tokenizer, example, 0.5) == "Five.<|im_end|>2 plus 3 makes 5.\n"
    assert text_weighted(tokenizer, example, 2.0) == "The answer is 5.<|im_end|>"


def test_without_answer_start_the_response_is_reasoning_and_all_ones_is_no_weights(tokenizer):
    example = encode(tokenizer, chat(), max_length=512, index=0, span_weights=WEIGHTS)
    assert text_weighted(tokenizer, example, 0.5) == RESPONSE + "<|im_end|>"
    ones = encode(
        tokenizer, chat(), max_length=512, index=0, span_weights=SpanWeights(), answer_start=3
    )
    assert ones.weights is None
    only_answer = SpanWeights(reasoning=1.0, answer=3.0)
    assert (
        encode(tokenizer, chat(), max_length=512, index=0, span_weights=only_answer).weights is None
    )


def test_a_template_that_rewrites_the_response_is_refused(tokenizer):
    tokenizer = make_tokenizer()
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "message['content']", "message['content'] | trim"
    )
    with pytest.raises(UserError, match="answer_start"):
        encode(
            tokenizer,
            chat("  " + RESPONSE),
            max_length=512,
            index=0,
            span_weights=WEIGHTS,
            answer_start=ANSWER_START + 2,
        )


def test_load_examples_reads_answer_start_and_rejects_a_bad_one(tokenizer, tmp_path: Path):
    records = [
        {"messages": PROMPT, "response": RESPONSE, "answer_start": ANSWER_START},
        {"prompt": "Hello world!", "response": "How are you today?"},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    first, second = load_examples(path, tokenizer, max_length=512, span_weights=WEIGHTS).examples
    assert text_weighted(tokenizer, first, 2.0) == "The answer is 5.<|im_end|>"
    assert set(
        w for t, w in zip(second.targets, second.weights, strict=True) if t != IGNORE_INDEX
    ) == {0.5}
    unweighted = load_examples(path, tokenizer, max_length=512).examples
    assert all(e.weights is None for e in unweighted)

    records[1]["answer_start"] = 999
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(InputError, match=r"d.jsonl:2.*answer_start"):
        load_examples(path, tokenizer, max_length=512, span_weights=WEIGHTS)


def test_collate_lays_out_weights_with_ones_for_unweighted_examples(tokenizer):
    weighted = encode(
        tokenizer, chat(), max_length=512, index=0, span_weights=WEIGHTS, answer_start=0
    )
    plain = encode(tokenizer, chat(), max_length=512, index=1)
    batch = collate([weighted, plain], [[0, 1], [1]], pad_id=0)
    n = len(weighted)
    assert batch.weights.shape == batch.targets.shape
    torch.testing.assert_close(batch.weights[0, :n], torch.tensor(weighted.weights))
    assert (batch.weights[0, n:] == 1).all() and (batch.weights[1] == 1).all()
    assert collate([plain], [[0]], pad_id=0).weights is None
