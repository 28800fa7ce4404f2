"""Every shipped recipe opens with the command that runs it, and that command's `--dry-run`
resolves it (the whole recipe validated, the plan printed, nothing run or loaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
from needs import SMOLLM2_INSTALLED
from shipped import RECIPES, ROOT, opening_command

from lmdistill.cli import main
from lmdistill.teachers.bundled import BUNDLED, DEFAULT_TEACHER

INSTALL = BUNDLED[DEFAULT_TEACHER].pip_command

# What a recipe may lack on a CPU machine with the default install, by recipe key: the GPU
# recipe's vLLM and model dirs, the optional Gemma teacher and the data file its comment makes.
MACHINE_NEEDS = {
    "multi_gpu.yaml": {"teacher", "prompts.path", "train.student.model", "train.teacher.model"},
    "cross_tokenizer.yaml": {"teacher.model", "data.path"},
}


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_dry_runs_with_its_opening_command(path: Path, monkeypatch, capsys):
    """The dry run checks the whole recipe: a shipped one passes, except for what the machine
    lacks (listed above; then nothing else may fail)."""
    if not SMOLLM2_INSTALLED and DEFAULT_TEACHER in path.read_text():
        pytest.skip(f"{path.name} names the bundled teacher, not installed here ({INSTALL})")
    monkeypatch.chdir(ROOT)  # recipes name repository paths (recipes/, lmdistill/assets/)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")  # API recipes need a key; none is sent
    command = opening_command(path)
    assert command[1] == f"recipes/{path.name}"
    code = main([*command, "--dry-run"])
    out, err = capsys.readouterr()
    if code == 0:
        assert "plan" in out.lower()
        return
    assert code == 2
    prefix = f"lmdistill {command[0]}: error: recipes/{path.name}: "
    lines = err.strip().splitlines()
    assert all(line.startswith(prefix) for line in lines), err
    keys = {line.removeprefix(prefix).split(": ")[0] for line in lines}
    assert keys <= MACHINE_NEEDS.get(path.name, set()), err


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
        recipe = load_recipe(path, check=False)  # the settings; multi_gpu's models are absent
        config = train_config(recipe, str(path))
        if config is not None:
            kinds[path.stem] = tuple(o.kind for o in config.objectives)
            if config.teacher.cache:
                cached.append(path.stem)
    assert kinds["sft"] == ("sft",) and kinds["logit_kd"] == ("logits",)
    assert kinds["hidden_kd"] == ("logits", "hidden")
    assert cached == ["cached_logit_kd", "quickstart_large"]
