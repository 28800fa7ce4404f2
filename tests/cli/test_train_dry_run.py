"""`lmdistill train RECIPE --dry-run`: the resolved recipe and the plan, nothing loaded."""

from __future__ import annotations

from pathlib import Path

import yaml
from needs import needs_smollm2

from lmdistill.cli import main
from lmdistill.training import loop
from lmdistill.training.config import load_config, validate

ROOT = Path(__file__).resolve().parents[2]


@needs_smollm2  # the recipe's online teacher is the bundled one
def test_dry_run_prints_the_resolved_recipe_and_the_plan_without_loading(
    tmp_path, monkeypatch, capsys
):
    def no_training(*args, **kwargs):
        raise AssertionError("--dry-run must not build a Trainer")

    monkeypatch.setattr(loop.Trainer, "__init__", no_training)
    # A training recipe on its own: the train section of the shipped on-policy run recipe, with
    # what `lmdistill run` would fill in (run_dir, data.path, the online teacher).
    raw = yaml.safe_load((ROOT / "recipes" / "on_policy.yaml").read_text())["train"]
    raw.update(run_dir=str(tmp_path / "run"), teacher={"model": "smollm2-135m-instruct"})
    raw["data"]["path"] = str(tmp_path / "responses.jsonl")
    # The dry run checks the data file's first record (it reads no more).
    (tmp_path / "responses.jsonl").write_text('{"prompt": "1 + 1?", "response": "2"}\n')
    recipe = tmp_path / "on_policy_train.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    overrides = ["optim.steps=40", "on_policy.lambda=0.25"]
    assert main(["train", str(recipe), *overrides, "--dry-run"]) == 0
    out = capsys.readouterr().out
    resolved, plan = out.rsplit("\n\n", 1)
    config = validate(yaml.safe_load(resolved), "printed")
    assert config == load_config(recipe, overrides)
    assert plan.startswith("Plan: train the student built from teacher 'smollm2-135m-instruct'")
    for words in ("online teacher 'smollm2-135m-instruct'", "40 optimizer steps", "fraction 0.25"):
        assert words in plan
