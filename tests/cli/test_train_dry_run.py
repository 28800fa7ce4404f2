"""`lmdistill train RECIPE --dry-run`: the resolved recipe and the plan, nothing loaded."""

from __future__ import annotations

from pathlib import Path

import yaml

from lmdistill.cli import main
from lmdistill.training import loop
from lmdistill.training.config import load_config, validate

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_prints_the_resolved_recipe_and_the_plan_without_loading(monkeypatch, capsys):
    def no_training(*args, **kwargs):
        raise AssertionError("--dry-run must not build a Trainer")

    monkeypatch.setattr(loop.Trainer, "__init__", no_training)
    monkeypatch.chdir(ROOT)
    recipe = "recipes/on_policy.yaml"
    assert main(["train", recipe, "optim.steps=40", "on_policy.lambda=0.25", "--dry-run"]) == 0
    out = capsys.readouterr().out
    resolved, plan = out.rsplit("\n\n", 1)
    config = validate(yaml.safe_load(resolved), "printed")
    assert config == load_config(recipe, ["optim.steps=40", "on_policy.lambda=0.25"])
    assert plan.startswith("Plan: train the student built from teacher 'smollm2-135m-instruct'")
    for words in ("online teacher 'smollm2-135m-instruct'", "40 optimizer steps", "fraction 0.25"):
        assert words in plan
