"""data.span_weights reach both the sft and the logits objectives in the loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import recipe

from lmdistill.training.config import validate
from lmdistill.training.loop import train


def first_step(tmp_path, name, student_dir, teacher_dir, data, span_weights=None):
    raw = recipe(
        tmp_path / name,
        student_dir,
        data,
        teacher={"model": str(teacher_dir)},
        objectives=[{"kind": "sft"}, {"kind": "logits", "alpha": 0.5}],
        optim={"lr": 1e-3, "steps": 1},
    )
    raw["data"]["span_weights"] = span_weights
    return train(validate(raw, name)).history[0]


def test_span_weights_scale_the_sft_and_logits_losses(
    tmp_path: Path, student_dir: Path, teacher_dir: Path, sft_data: Path
):
    records = [json.loads(line) for line in sft_data.read_text().splitlines()]
    for r in records:  # the last word of each response is its "answer"
        r["answer_start"] = r["response"].rstrip().rfind(" ") + 1
    data = tmp_path / "answers.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))

    plain = first_step(tmp_path, "plain", student_dir, teacher_dir, data)
    ones = first_step(tmp_path, "ones", student_dir, teacher_dir, data, {})
    doubled = first_step(
        tmp_path, "doubled", student_dir, teacher_dir, data, {"reasoning": 2, "answer": 2}
    )
    no_answer = first_step(tmp_path, "no_answer", student_dir, teacher_dir, data, {"answer": 0})
    for key in ("loss/sft", "loss/logits"):
        assert ones[key] == plain[key]  # all-one weights change nothing, bitwise
        assert doubled[key] == pytest.approx(2 * plain[key], rel=1e-5)  # same denominator
        assert 0 < no_answer[key] < plain[key]
    assert doubled["loss_tokens"] == plain["loss_tokens"] == no_answer["loss_tokens"]
