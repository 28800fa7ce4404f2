"""The teacher's side of cross-tokenizer distillation: the plain template for teachers without one,
teacher-side collation in the student's rows, and the index alignment of response positions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import make_other_tokenizer, make_tokenizer

from lmdistill.data.cross_tokenizer import (
    aligned_fraction,
    collate_teacher,
    load_teacher_examples,
    response_positions,
)
from lmdistill.data.sft import IGNORE_INDEX, collate, load_examples
from lmdistill.models import PLAIN_CHAT_TEMPLATE, ensure_chat_template


def write_records(path: Path, responses: list[str]) -> Path:
    records = [
        {"messages": [{"role": "user", "content": f"question {i}"}], "response": r}
        for i, r in enumerate(responses)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


RESPONSES = [
    "The capital of France is Paris.",
    "What is 7 * 6? The answer is 42.",
    "Hello world! How are you today?",
]


def test_plain_template_opens_with_bos_and_extends_its_prefixes() -> None:
    tok = make_other_tokenizer()
    assert ensure_chat_template(tok) and tok.chat_template == PLAIN_CHAT_TEMPLATE
    assert not ensure_chat_template(tok)  # a template is kept
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(messages, tokenize=False)
    assert prompt == "<bos>Be brief.\n\nUser: Hi\n\nAssistant:"
    assert full == prompt + " Hello.<eos>\n\n"


def test_teacher_examples_use_the_teachers_own_tokenization(tmp_path: Path) -> None:
    data = write_records(tmp_path / "d.jsonl", RESPONSES)
    teacher_tok = make_other_tokenizer()
    teachers = load_teacher_examples(data, teacher_tok, max_length=64)
    assert sorted(teachers) == [0, 1, 2]
    first = teachers[0]
    assert first.input_ids[0] == teacher_tok.bos_token_id
    # The targets are the teacher's tokens of " The capital of France is Paris.<eos>".
    answer = [t for t in first.targets if t != IGNORE_INDEX]
    assert teacher_tok.decode(answer) == " The capital of France is Paris.<eos>"


def test_collated_pairs_align_the_ith_response_positions(tmp_path: Path) -> None:
    data = write_records(tmp_path / "d.jsonl", RESPONSES)
    student_tok = make_tokenizer()
    students = load_examples(data, student_tok, max_length=64).examples
    teachers = load_teacher_examples(data, make_other_tokenizer(), max_length=64)
    micro_batch = [[0, 2], [1]]  # packed: examples 0 and 2 share a row
    batch = collate(students, micro_batch, pad_id=0)
    side = collate_teacher(students, teachers, micro_batch, pad_id=0)

    assert side.input_ids.shape[0] == 2 and side.student_rows.shape == side.teacher_rows.shape
    expected = sum(
        min(students[i].loss_tokens, teachers[students[i].index].loss_tokens)
        for row in micro_batch
        for i in row
    )
    assert side.student_rows.numel() == expected
    # Every pair is a response position on both sides, and the teacher's packed rows restart
    # their position ids per example like the student's.
    assert torch.all(batch.targets.reshape(-1)[side.student_rows] != IGNORE_INDEX)
    t_targets = torch.full(side.input_ids.shape, IGNORE_INDEX)
    start = 0
    for i in micro_batch[0]:
        t = teachers[students[i].index]
        t_targets[0, start : start + len(t)] = torch.tensor(t.targets)
        start += len(t)
    t_targets[1, : len(teachers[1])] = torch.tensor(teachers[1].targets)
    assert torch.all(t_targets.reshape(-1)[side.teacher_rows] != IGNORE_INDEX)
    assert side.position_ids[0, len(teachers[0])] == 0
    # The first pair of each example is its first response position on both sides.
    first_student = batch.targets.reshape(-1)[side.student_rows[0]]
    assert first_student == students[0].targets[response_positions(students[0])[0]]


def test_same_tokenizer_alignment_is_the_identity(tmp_path: Path) -> None:
    data = write_records(tmp_path / "d.jsonl", RESPONSES)
    tok = make_tokenizer()
    students = load_examples(data, tok, max_length=64).examples
    teachers = load_teacher_examples(data, make_tokenizer(), max_length=64)
    side = collate_teacher(students, teachers, [[0, 1], [2]], pad_id=0)
    assert torch.equal(side.student_rows, side.teacher_rows)
    assert aligned_fraction(students, teachers) == 1.0


def test_an_example_missing_on_the_teacher_side_gets_no_pairs(tmp_path: Path) -> None:
    data = write_records(tmp_path / "d.jsonl", RESPONSES)
    students = load_examples(data, make_tokenizer(), max_length=64).examples
    all_teachers = load_teacher_examples(data, make_other_tokenizer(), max_length=64)
    teachers = {r: all_teachers[r] for r in all_teachers if r != 1}  # record 1 cut on its side
    side = collate_teacher(students, teachers, [[0, 1, 2]], pad_id=0)
    assert side.student_rows.numel() == sum(
        min(students[i].loss_tokens, teachers[i].loss_tokens) for i in (0, 2)
    )
    assert aligned_fraction(students, teachers) < 1.0
    # The teacher row holds examples 0 and 2 only, back to back.
    assert int(side.real.sum()) == len(teachers[0]) + len(teachers[2])


@pytest.mark.parametrize("micro_batch", [[[0], [1], [2]], [[0, 1, 2]]])
def test_rows_move_to_a_device(tmp_path: Path, micro_batch: list[list[int]]) -> None:
    data = write_records(tmp_path / "d.jsonl", RESPONSES)
    students = load_examples(data, make_tokenizer(), max_length=64).examples
    teachers = load_teacher_examples(data, make_other_tokenizer(), max_length=64)
    side = collate_teacher(students, teachers, micro_batch, pad_id=0).to("cpu")
    assert side.student_rows.dtype == torch.long and side.input_ids.device.type == "cpu"
