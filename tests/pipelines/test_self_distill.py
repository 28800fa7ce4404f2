"""Self-distillation rounds (lmdistill.pipelines.self_distill) on a tiny random model with a tiny
reward function: the rounds run, rerunning skips finished rounds, early stopping, dry run, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from lmdistill.cli import main
from lmdistill.errors import UserError
from lmdistill.pipelines.self_distill import (
    SelfDistillConfig,
    _evaluate,
    held_out_evaluator,
    load_self_distill_config,
    make_scorer,
    self_distill,
)
from lmdistill.tasks import get_task
from lmdistill.tasks.base import Example


def shortness(prompt_messages: list[dict], response: str) -> float:
    """The reward the tests select by: shorter responses score higher, in [0, 1]."""
    assert prompt_messages[-1]["role"] == "user"
    return 1.0 - min(len(response), 100) / 100


def recipe(run_dir: Path, model: Path, **changes) -> dict:
    raw = {
        "run_dir": str(run_dir),
        "model": str(model),
        "task": "arithmetic_1digit",
        "rounds": 2,
        "prompts": {"limit": 6},
        "eval": {"limit": 4, "max_tokens": 6},
        "sampling": {"n": 2, "temperature": 1.0, "max_tokens": 8, "batch_size": 16},
        "scorer": f"reward:{__name__}:shortness",
        "select": {"keep": "best", "min_score": 0.0},
        "train": {
            "max_length": 240,
            "precision": "no",
            "batch": {"tokens_per_micro_batch": 512, "micro_batches_per_step": 1},
            "optim": {"lr": 1e-3, "steps": 2},
        },
        "progress": False,
    }
    raw.update(changes)
    return raw


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory, tiny_model_dir):
    run_dir = tmp_path_factory.mktemp("sd") / "run"
    config = SelfDistillConfig.model_validate(recipe(run_dir, tiny_model_dir, template="concise"))
    return config, self_distill(config)


def test_the_rounds_run_and_the_table_has_a_row_per_round(two_rounds):
    config, result = two_rounds
    assert [row["round"] for row in result.rows] == [0, 1, 2] and result.ran == [0, 1, 2]
    run_dir = Path(config.run_dir)
    table = (run_dir / "rounds.md").read_text().splitlines()
    assert sum(line.startswith("| ") for line in table) == 1 + 3  # header + R+1 rows
    saved = json.loads((run_dir / "rounds.json").read_text())
    assert [row["round"] for row in saved["rows"]] == [0, 1, 2]
    assert (run_dir / "rounds.png").read_bytes().startswith(b"\x89PNG")
    # Round r trains the model round r-1 made; the last round's model is the result.
    assert result.rows[1]["model"] == str(run_dir / "round_1" / "train" / "final")
    trained_from = yaml.safe_load((run_dir / "round_2/train/config.yaml").read_text())
    assert trained_from["student"]["model"] == result.rows[1]["model"]
    assert result.final_model == result.rows[2]["model"]
    for row in result.rows:
        assert 0.0 <= row["eval_score"] <= 1.0 and row["eval_n"] == 4


def test_selection_keeps_the_best_sample_by_the_reward(two_rounds):
    config, _ = two_rounds
    round_dir = Path(config.run_dir) / "round_1"
    samples = [json.loads(line) for line in (round_dir / "samples.jsonl").read_text().splitlines()]
    kept = [json.loads(line) for line in (round_dir / "kept.jsonl").read_text().splitlines()]
    assert len(samples) == 6 * 2 and len(kept) == 6
    for record in kept:
        mine = [shortness(s["messages"], s["response"]) for s in samples if s["id"] == record["id"]]
        assert record["score"] == pytest.approx(max(mine))


def test_the_held_out_evaluation_is_evaluate_s_and_cached_in_the_run_dir(
    two_rounds, tmp_path, monkeypatch
):
    config, result = two_rounds
    evaluator = held_out_evaluator(get_task(config.task), config)
    assert evaluator.name == "template:concise:arithmetic_1digit"  # as `lmdistill eval` names it
    assert (evaluator.template, evaluator.split) == ("concise", "test")

    def no_model(*args, **kwargs):
        raise AssertionError("a cached evaluation loaded a model")

    monkeypatch.setattr("lmdistill.eval.runner.load_teacher", no_model)
    row = _evaluate(result.rows[1]["model"], get_task(config.task), tmp_path, config)
    evaluated = ("model", "eval_score", "eval_low", "eval_high", "eval_n")
    assert {k: row[k] for k in evaluated} == {k: result.rows[1][k] for k in evaluated}
    lines = (Path(config.run_dir) / "round_1" / "eval.jsonl").read_text().splitlines()
    assert [sorted(json.loads(line)) for line in lines] == [["id", "response", "score"]] * 4


def test_a_rerun_skips_finished_rounds(two_rounds, monkeypatch):
    config, first = two_rounds

    def no_model(*args, **kwargs):
        raise AssertionError("a finished round loaded a model")

    monkeypatch.setattr("lmdistill.teachers.registry.load_teacher", no_model)
    again = self_distill(config)
    assert again.ran == [] and again.rows == first.rows


def test_more_rounds_continue_after_the_last_finished_one(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    self_distill(SelfDistillConfig.model_validate(recipe(run_dir, tiny_model_dir, rounds=1)))
    more = self_distill(SelfDistillConfig.model_validate(recipe(run_dir, tiny_model_dir, rounds=2)))
    assert more.ran == [2] and [row["round"] for row in more.rows] == [0, 1, 2]
    changed = recipe(run_dir, tiny_model_dir, sampling={"n": 3, "temperature": 1.0})
    with pytest.raises(UserError, match=r"other settings \(sampling\.[^)]*\bsampling\.n\)"):
        self_distill(SelfDistillConfig.model_validate(changed))


def test_early_stop_ends_the_rounds_without_improvement(tmp_path, tiny_model_dir):
    # A tiny random model does not gain half the held-out examples in a round.
    stop = {"patience": 1, "min_improvement": 0.5}
    raw = recipe(tmp_path / "run", tiny_model_dir, rounds=3, early_stop=stop)
    result = self_distill(SelfDistillConfig.model_validate(raw))
    assert [row["round"] for row in result.rows] == [0, 1]
    assert result.stopped and "early stop after round 1" in result.stopped
    assert "early stop" in (tmp_path / "run" / "rounds.md").read_text()


def test_teacher_loglik_scorer_is_a_mean_log_probability(tmp_path, tiny_model_dir):
    config = SelfDistillConfig.model_validate(
        recipe(tmp_path, tiny_model_dir, scorer=f"teacher_loglik:{tiny_model_dir}")
    )
    score, close = make_scorer(config)
    example = Example("x", [{"role": "user", "content": "What is 2 + 3?"}], "5")
    values = [score(example, text) for text in ["The answer is 5.", "5"]]
    close()
    assert all(math.isfinite(v) and v < 0 for v in values)


def write_recipe(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "sd.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_dry_run_prints_the_plan_and_loads_no_model(tmp_path, tiny_model_dir, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("--dry-run loaded a model")

    monkeypatch.setattr("lmdistill.teachers.registry.load_teacher", no_model)
    path = write_recipe(tmp_path, recipe(tmp_path / "run", tiny_model_dir))
    assert main(["self-distill", str(path), "rounds=3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "rounds: 3" in out  # the resolved recipe, overrides applied
    assert "plan:" in out and "round 3:" in out and "round 4" not in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sampling.nn=3", "sampling.nn: unknown key"),
        ("scorer=reward:nomodule", "scorer: expected one of task"),
        ("template=nope", "template: unknown template"),
    ],
)
def test_a_bad_key_is_one_line_naming_the_file_and_key(tmp_path, capsys, override, message):
    path = write_recipe(tmp_path, recipe(tmp_path / "run", tmp_path))
    assert main(["self-distill", str(path), override, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lmdistill self-distill: error: {path}: ") and message in err
    assert "\n" not in err


def test_a_reward_that_does_not_import_fails_the_dry_run(tmp_path, capsys):
    path = write_recipe(tmp_path, recipe(tmp_path / "run", tmp_path, scorer="reward:nope_mod:f"))
    assert main(["self-distill", str(path), "--dry-run"]) == 2
    assert "cannot import module 'nope_mod'" in capsys.readouterr().err


def test_the_shipped_recipe_loads():
    path = Path(__file__).parents[2] / "recipes" / "self_distill.yaml"
    config = load_self_distill_config(path)
    assert path.read_text().splitlines()[0] == "# lmdistill self-distill recipes/self_distill.yaml"
    assert config.model == "smollm2-135m-instruct" and config.task == "arithmetic_1digit"


def test_a_round_that_keeps_nothing_ends_the_run_with_the_model_unchanged(tmp_path, tiny_model_dir):
    raw = recipe(tmp_path / "run", tiny_model_dir, select={"min_score": 1.5})  # shortness <= 1
    result = self_distill(SelfDistillConfig.model_validate(raw))
    assert [row["round"] for row in result.rows] == [0, 1]
    assert result.stopped == "round 1 kept no samples"
    assert result.rows[1]["model"] == str(tiny_model_dir)
    assert result.rows[1]["eval_score"] == result.rows[0]["eval_score"]
    assert not (tmp_path / "run" / "round_1" / "train").exists()
