"""The uld objective: a student with ANOTHER tokenizer (other vocabulary, merges, special tokens and
chat template) trained from a tiny trained teacher through the loop; config errors; and that runs
without uld are unchanged."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import recipe
from tiny import make_other_tokenizer, make_tiny_model

from lmdistill.errors import UserError
from lmdistill.models import ensure_chat_template
from lmdistill.training.config import validate
from lmdistill.training.loop import Trainer


@pytest.fixture(scope="module")
def other_student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide tiny Llama (random init) with a different tokenizer and template."""
    path = tmp_path_factory.mktemp("other-student")
    tokenizer = make_other_tokenizer()
    ensure_chat_template(tokenizer)  # the plain User:/Assistant: transcript
    make_tiny_model(tokenizer, layers=2, hidden=32, seed=3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def uld_recipe(tmp_path: Path, student: Path, teacher: Path, data: Path, **objective) -> dict:
    raw = recipe(
        tmp_path / "run",
        student,
        data,
        objectives=[{"kind": "uld", "top_k": None, **objective}],
        optim={"lr": 3e-3, "steps": 16, "warmup_steps": 1, "schedule": "constant"},
    )
    raw["teacher"] = {"model": str(teacher)}
    return raw


def test_student_with_another_vocabulary_trains_and_its_held_out_ce_falls(
    tmp_path: Path, other_student_dir: Path, teacher_dir: Path, sft_data: Path
) -> None:
    trainer = Trainer(validate(uld_recipe(tmp_path, other_student_dir, teacher_dir, sft_data), "t"))
    assert trainer.tokenizer.get_vocab() != trainer.cross.tokenizer.get_vocab()
    assert 0.3 < trainer.info["uld_aligned_fraction"] <= 1.0
    before = trainer.run_eval()
    result = trainer.run()
    losses = [r["loss"] for r in result.history]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) < sum(losses[:3])
    # The held-out score: the student's cross-entropy on the teacher's held-out responses.
    assert result.eval["ce"] < before["ce"] - 0.5
    assert set(result.eval) == {"tokens", "ce"}  # no shared vocabulary: no KL / top-1


def test_the_uld_term_alone_pulls_the_students_sorted_distribution_to_the_teachers(
    tmp_path: Path, other_student_dir: Path, teacher_dir: Path, sft_data: Path
) -> None:
    raw = uld_recipe(tmp_path, other_student_dir, teacher_dir, sft_data, alpha=1.0, top_k=16)
    raw["optim"].update(lr=1e-2, steps=20)
    losses = [r["loss/uld"] for r in Trainer(validate(raw, "t")).run().history]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3])


def test_uld_between_a_model_and_itself_is_zero(
    tmp_path: Path, teacher_dir: Path, sft_data: Path
) -> None:
    raw = uld_recipe(tmp_path, teacher_dir, teacher_dir, sft_data, alpha=1.0)
    trainer = Trainer(validate(raw, "t"))
    batches = trainer.step_batches(0)
    counts = trainer._global_counts(batches)
    for batch in batches:
        # Same tokenizer: the alignment is the identity.
        assert torch.equal(batch.teacher_side.student_rows, batch.teacher_side.teacher_rows)
        with torch.no_grad():
            loss, _ = trainer.module(batch, trainer.teacher(batch), counts)
        assert loss.item() == pytest.approx(0.0, abs=1e-5)


def test_runs_without_uld_build_no_teacher_side(
    tmp_path: Path, student_dir: Path, sft_data: Path
) -> None:
    trainer = Trainer(validate(recipe(tmp_path / "run", student_dir, sft_data), "t"))
    assert trainer.cross is None and "uld_aligned_fraction" not in trainer.info
    assert all(b.teacher_side is None for b in trainer.step_batches(0))


def test_uld_with_an_offline_cache_is_a_clear_error(
    tmp_path: Path, student_dir: Path, teacher_dir: Path, sft_data: Path
) -> None:
    raw = uld_recipe(tmp_path, student_dir, teacher_dir, sft_data)
    raw["teacher"]["cache"] = str(tmp_path / "cache")
    with pytest.raises(UserError, match=r"objectives\.0: uld cannot use teacher\.cache"):
        validate(raw, "r.yaml")
    del raw["teacher"]["model"]
    with pytest.raises(UserError, match=r"uld cannot use teacher\.cache"):
        validate(raw, "r.yaml")


def test_uld_needs_a_teacher_model_and_no_logit_or_hidden_objective(
    tmp_path: Path, student_dir: Path, teacher_dir: Path, sft_data: Path
) -> None:
    raw = uld_recipe(tmp_path, student_dir, teacher_dir, sft_data)
    del raw["teacher"]
    with pytest.raises(UserError, match=r"uld needs teacher\.model"):
        validate(raw, "r.yaml")
    raw = uld_recipe(tmp_path, student_dir, teacher_dir, sft_data)
    raw["objectives"].append({"kind": "logits"})
    with pytest.raises(UserError, match="cannot be combined with logits or hidden"):
        validate(raw, "r.yaml")
    raw["objectives"] = [{"kind": "uld", "alpha": 1.5}]
    with pytest.raises(UserError, match=r"objectives\.0\.alpha"):
        validate(raw, "r.yaml")
