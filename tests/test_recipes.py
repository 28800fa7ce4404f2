"""Every shipped recipe opens with the command that runs it, and that command's `--dry-run`
resolves it (the whole recipe validated, the plan printed, nothing run or loaded)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from lmdistill.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def opening_command(path: Path) -> list[str]:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# lmdistill "), f"{path.name} must open with its command: {first}"
    return shlex.split(first.removeprefix("# lmdistill "))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_dry_runs_with_its_opening_command(path: Path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # recipes name repository paths (recipes/, lmdistill/assets/)
    command = opening_command(path)
    assert command[1] == f"recipes/{path.name}"
    assert main([*command, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "plan" in out.lower()


def test_the_recipes_cover_every_scenario():
    """The scenarios the README lists, each with a recipe."""
    names = {p.stem for p in RECIPES}
    assert {
        "api_sft",
        "sft",
        "logit_kd",
        "cached_logit_kd",
        "hidden_kd",
        "reasoning",
        "tool_use",
        "self_distill",
        "on_policy",
        "cross_tokenizer",
        "multi_gpu",
    } <= names


def test_run_recipes_train_with_the_methods_they_name(monkeypatch):
    from lmdistill.pipelines.run import load_recipe, train_config

    monkeypatch.chdir(ROOT)
    kinds, cached = {}, []
    for path in RECIPES:
        if opening_command(path)[0] != "run":
            continue
        recipe = load_recipe(path)
        config = train_config(recipe, str(path))
        if config is not None:
            kinds[path.stem] = tuple(o.kind for o in config.objectives)
            if config.teacher.cache:
                cached.append(path.stem)
    assert kinds["sft"] == ("sft",) and kinds["logit_kd"] == ("logits",)
    assert kinds["hidden_kd"] == ("logits", "hidden")
    assert cached == ["cached_logit_kd"]
