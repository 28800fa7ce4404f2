"""Multiple choice by log-likelihood: the raw and length-normalised choices on a hand-made case,
with a model whose every log-probability the test knows; the file format and the built-in set."""

import json

import pytest
import torch
from eval_fakes import UnigramModel
from tiny import make_tokenizer

from lmdistill.errors import InputError
from lmdistill.eval.base import EvalSettings
from lmdistill.eval.likelihood import encode_text
from lmdistill.eval.multiple_choice import (
    BUILTIN_PATH,
    MultipleChoiceEval,
    Question,
    choose,
    format_messages,
    load_questions,
    option_log_probs,
    split_format,
)

LONG = "Hello world! How are you today?"  # in the tokenizer's corpus: few tokens for many bytes
SHORT = "zq"  # unseen letters: one byte-level token per byte


@pytest.fixture(scope="module")
def uniform_model() -> UnigramModel:
    tokenizer = make_tokenizer()
    return UnigramModel(tokenizer, torch.zeros(len(tokenizer)))  # every token: log(1 / V)


def test_choose_raw_and_per_byte():
    # Totals -4 and -6: raw picks the first; per byte, -4/2 = -2 and -6/8 = -0.75: the second.
    assert choose([-4.0, -6.0], ["ab", "abcdefgh"]) == (0, 1)
    assert choose([-1.0, -1.0], ["a", "b"]) == (0, 0)  # ties go to the earlier option


def test_option_log_probs_are_sums_of_token_log_probs(uniform_model):
    vector = torch.randn(len(uniform_model.tokenizer), generator=torch.Generator().manual_seed(0))
    model = UnigramModel(uniform_model.tokenizer, vector)
    question = Question("q1", "Say something.", (LONG, SHORT, "Paris"), 0)
    got = option_log_probs(model, [question], "cloze", token_budget=4096)[0]
    expected = [
        sum(model.log_prob(t) for t in encode_text(model, text)) for text in question.choices
    ]
    assert got == pytest.approx(expected, abs=1e-4)


def test_raw_prefers_few_tokens_and_normalised_prefers_bytes_per_token(uniform_model, tmp_path):
    # Under a uniform model an option's total is -(its tokens) log V: raw accuracy picks the
    # option with fewest tokens (SHORT), per-byte accuracy the one with most bytes per token.
    assert len(encode_text(uniform_model, SHORT)) < len(encode_text(uniform_model, LONG))
    path = tmp_path / "case.jsonl"
    path.write_text(json.dumps({"question": "Greet me.", "choices": [SHORT, LONG], "answer": 1}))
    result = MultipleChoiceEval("mc-jsonl:case", path, "cloze").run(uniform_model, EvalSettings())
    assert result.metrics["accuracy"].value == 0.0
    assert result.metrics["accuracy_norm"].value == 1.0
    assert result.records[0]["choice"] == 0 and result.records[0]["choice_norm"] == 1


def test_batches_do_not_change_scores(uniform_model):
    questions = load_questions(BUILTIN_PATH)[:6]
    one_pass = option_log_probs(uniform_model, questions, "cloze", token_budget=100_000)
    rows_before = len(uniform_model.forward_rows)
    many = option_log_probs(uniform_model, questions, "cloze", token_budget=40)
    assert len(uniform_model.forward_rows) - rows_before > 1
    assert [x for row in many for x in row] == pytest.approx([x for row in one_pass for x in row])


def test_letters_format_lists_options_and_scores_letters():
    question = Question("q", "Which is red?", ("Sky", "Blood"), 1)
    content = format_messages(question, "letters")[0]["content"]
    assert "A. Sky\nB. Blood" in content
    assert format_messages(question, "cloze")[0]["content"] == "Which is red?"
    assert split_format("data.jsonl@letters") == ("data.jsonl", "letters")
    assert split_format("a@b.jsonl") == ("a@b.jsonl", "cloze")


def test_builtin_set_is_well_formed():
    questions = load_questions(BUILTIN_PATH)
    assert 40 <= len(questions) <= 60
    assert all(len(q.choices) == 4 for q in questions)
    counts = [sum(q.answer == i for q in questions) for i in range(4)]
    assert max(counts) - min(counts) <= 1  # the right answer is not always in one place


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"question": "q", "choices": ["a"], "answer": 0}, "choices"),
        ({"question": "q", "choices": ["a", "a"], "answer": 0}, "choices"),
        ({"question": "q", "choices": ["a", "b"], "answer": 2}, "answer"),
        ({"question": "", "choices": ["a", "b"], "answer": 0}, "question"),
    ],
)
def test_bad_records_name_line_and_field(tmp_path, record, field):
    path = tmp_path / "mc.jsonl"
    good = {"question": "q", "choices": ["x", "y"], "answer": "y"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(InputError, match=rf"mc.jsonl:2: field '{field}'"):
        load_questions(path)


def test_answer_by_text_or_letter(tmp_path):
    path = tmp_path / "mc.jsonl"
    rows = [
        {"question": "q", "choices": ["x", "y", "z"], "answer": "z"},
        {"question": "q", "choices": ["x", "y", "z"], "answer": "b"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [q.answer for q in load_questions(path)] == [2, 1]
