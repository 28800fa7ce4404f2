"""`kill -9` at the moments issue 19 names, then a rerun through `lmdistill train` and through
`lmdistill run`: the final student is whole, equals the uninterrupted one byte for byte, and
metrics.jsonl holds every step and every evaluation exactly once.

The kill is a real SIGKILL that the process sends itself at a named point
(`lmdistill.store.crash_point`, armed by $LMDISTILL_TEST_CRASH_AT), so the disk holds exactly what
a `kill -9` at that moment leaves; killing from outside at a random time could not hit "after the
weights, before the tokenizer" reliably."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import recipe

from lmdistill.cli import main
from lmdistill.errors import UserError
from lmdistill.pipelines.run import load_recipe, run_recipe
from lmdistill.store.atomic import COMPLETE_MARKER, CRASH_ENV
from lmdistill.training.config import validate
from lmdistill.training.loop import Trainer, is_trained, train

REPO = Path(__file__).resolve().parents[2]
# 5 steps; checkpoints at 2 and 4 (and 5: the last step); evaluations at 2, 4 and 5.
SECTIONS = dict(
    optim={"lr": 3e-3, "steps": 5, "warmup_steps": 1},
    checkpoint={"every": 2, "keep": 1},
    eval={"every": 2},
)
FINAL_SAVE = ["save-student:before-weights", "save-student:before-tokenizer"]
# The 5th line of metrics.jsonl: info (step 0), step 1, step 2, eval at 2, then step 3's record,
# after the step-2 checkpoint. The kill leaves half of it on disk.
MID_METRICS_LINE = "metrics-line@5"


def _train_recipe(run_dir: Path, student_dir: Path, data: Path) -> dict:
    return recipe(run_dir, student_dir, data, **SECTIONS)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, student_dir: Path, sft_data: Path):
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    return train(validate(_train_recipe(run_dir, student_dir, sft_data), "reference")).final_dir


def _cli(*args: str, crash: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash is not None:
        env[CRASH_ENV] = crash
    return subprocess.run(
        [sys.executable, "-m", "lmdistill", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _killed(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]


def _assert_same_student(final: Path, reference: Path) -> None:
    """Every file of the two model dirs (weights, config, generation config, tokenizer, chat
    template, completion marker) is byte-identical."""
    assert is_trained(final.parent)
    names = sorted(p.name for p in final.iterdir())
    assert names == sorted(p.name for p in reference.iterdir())
    assert {"model.safetensors", "config.json", "tokenizer.json", COMPLETE_MARKER} <= set(names)
    for name in names:
        assert (final / name).read_bytes() == (reference / name).read_bytes(), name


def _assert_each_record_once(run_dir: Path) -> None:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kinds = Counter(
        ("info" if "info" in r else "eval" if "eval/ce" in r else "step", r["step"])
        for r in records
    )
    assert set(kinds.values()) == {1}, kinds
    assert sorted(s for k, s in kinds if k == "step") == [1, 2, 3, 4, 5]
    assert sorted(s for k, s in kinds if k == "eval") == [2, 4, 5]
    assert [s for k, s in kinds if k == "info"] == [0]


@pytest.mark.slow
@pytest.mark.parametrize("moment", FINAL_SAVE)
def test_kill_while_final_is_written_then_a_plain_train_rerun_finishes_it(
    tmp_path: Path, student_dir: Path, sft_data: Path, uninterrupted: Path, moment: str
):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(_train_recipe(tmp_path / "run", student_dir, sft_data)))
    _killed(_cli("train", str(path), crash=moment))
    assert not (tmp_path / "run" / "final").exists()  # the half-written dir is a hidden sibling
    assert not is_trained(tmp_path / "run")

    rerun = _cli("train", str(path))  # no --resume: only the save was left to do
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "finishing it from step-00000005" in rerun.stderr
    assert "Traceback" not in rerun.stderr
    _assert_same_student(tmp_path / "run" / "final", uninterrupted)
    _assert_each_record_once(tmp_path / "run")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".final")] == []


@pytest.mark.slow
def test_kill_while_a_metrics_line_is_written_then_resume_drops_the_torn_line(
    tmp_path: Path, student_dir: Path, sft_data: Path, uninterrupted: Path
):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(_train_recipe(tmp_path / "run", student_dir, sft_data)))
    _killed(_cli("train", str(path), crash=MID_METRICS_LINE))
    assert not (tmp_path / "run" / "metrics.jsonl").read_bytes().endswith(b"\n")  # torn

    resumed = _cli("train", str(path), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    warnings = [line for line in resumed.stderr.splitlines() if "torn last line" in line]
    assert len(warnings) == 1 and "metrics.jsonl" in warnings[0]
    _assert_same_student(tmp_path / "run" / "final", uninterrupted)
    _assert_each_record_once(tmp_path / "run")


def _run_recipe(tmp_path: Path, student_dir: Path, data: Path) -> Path:
    """A `lmdistill run` recipe with only the train stage, trained like `uninterrupted`."""
    train_section = _train_recipe(tmp_path / "unused", student_dir, data)
    del train_section["run_dir"]  # the pipeline's: RUN_DIR/train
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "pipeline"), "train": train_section}))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("moment", [*FINAL_SAVE, MID_METRICS_LINE])
def test_kill_during_lmdistill_run_then_a_rerun_finishes_the_train_stage(
    tmp_path: Path, student_dir: Path, sft_data: Path, uninterrupted: Path, moment: str, capsys
):
    path = _run_recipe(tmp_path, student_dir, sft_data)
    _killed(_cli("run", str(path), crash=moment))
    run_dir = tmp_path / "pipeline" / "train"
    assert not is_trained(run_dir)

    assert main(["run", str(path)]) == 0
    assert "resuming" in capsys.readouterr().err
    _assert_same_student(run_dir / "final", uninterrupted)
    _assert_each_record_once(run_dir)
    again = run_recipe(load_recipe(path), source=str(path), log=None)
    assert [row.status for row in again.stages] == ["skipped (unchanged)"]


@pytest.mark.slow
def test_a_final_dir_an_older_version_left_half_written_is_rebuilt_not_trusted(
    tmp_path: Path, student_dir: Path, sft_data: Path, uninterrupted: Path, capsys
):
    """Before issue 19, final/ was written in place and "trained" meant final/config.json
    exists: a kill after the weights left a dir without tokenizer that `run` marked done."""
    path = _run_recipe(tmp_path, student_dir, sft_data)
    run_recipe(load_recipe(path), source=str(path), log=None)
    final = tmp_path / "pipeline" / "train" / "final"
    for name in (COMPLETE_MARKER, "tokenizer.json", "tokenizer_config.json"):
        (final / name).unlink()  # what the old in-place save left after the weights
    capsys.readouterr()

    rerun = run_recipe(load_recipe(path), source=str(path), log=print)
    assert [row.status for row in rerun.stages] == ["resumed"]
    err = capsys.readouterr()
    assert "[train] its output is incomplete" in err.out  # the run's line
    assert [line for line in err.err.splitlines() if "incomplete" in line] == [
        f"{final}: incomplete (its save was interrupted); it will be rebuilt"
    ]
    _assert_same_student(final, uninterrupted)
    _assert_each_record_once(final.parent)


def test_a_corrupt_metrics_line_that_is_not_the_last_is_a_one_line_error(
    tmp_path: Path, student_dir: Path, sft_data: Path
):
    raw = _train_recipe(tmp_path / "run", student_dir, sft_data)
    raw["optim"] = {**raw["optim"], "steps": 2}
    train(validate(raw, "short"))
    metrics = tmp_path / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], '{"step": 1, "loss": oops}', *lines[2:]]) + "\n")
    with pytest.raises(UserError, match=r"metrics\.jsonl:2: not valid JSON"):
        Trainer(validate(raw, "short"), resume=True).run()
