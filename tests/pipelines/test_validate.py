"""A recipe is checked whole before its first stage runs (issue 15): each broken recipe below fails
at once, exit 2, with a line naming the recipe key, and nothing is written to run_dir."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from lmdistill.cli import main

# Generous for a shared 2-core machine; a stage that started (a model load, a generation) would
# leave output in run_dir, which every case also checks.
FEW_SECONDS = 10.0


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def recipe(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A recipe that passes every check: each case breaks one thing in it with an override."""
    rows = [
        {"prompt": f"What is {i} + {i}?", "split": "test" if i % 4 == 0 else "train"}
        for i in range(8)
    ]
    raw = {
        "run_dir": str(tmp_path / "run"),
        "teacher": str(tiny_model_dir),
        "prompts": {"path": str(_write_jsonl(tmp_path / "prompts.jsonl", rows))},
        "generate": {"max_tokens": 4},
        "train": {
            "student": {"from_teacher": {"teacher": str(tiny_model_dir), "layers": 1}},
            "data": {"split": "train", "max_length": 64, "eval_fraction": 0},
            "batch": {"tokens_per_micro_batch": 128},
            "objectives": [{"kind": "logits", "alpha": 0.5}],
            "optim": {"steps": 2},
            "log": {"progress": False, "tensorboard": False},
        },
        "eval": {"held_out": True, "tasks": ["arithmetic_1digit"], "limit": 2, "max_tokens": 4},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    (tmp_path / "fsdp.yaml").write_text("distributed_type: FSDP\nnum_processes: 2\n")
    (tmp_path / "deepspeed.yaml").write_text("distributed_type: DEEPSPEED\n")
    _write_jsonl(tmp_path / "bad_prompts.jsonl", [{"promt": "What is 1 + 1?"}])
    _write_jsonl(tmp_path / "bad_data.jsonl", [{"prompt": "What is 1 + 1?"}])  # no response
    return path


@pytest.fixture
def other_tokenizer_dir(tmp_path: Path) -> Path:
    """A tiny model whose tokenizer is not the tiny teacher's."""
    from tiny import make_other_tokenizer, make_tiny_model

    tokenizer = make_other_tokenizer()
    path = tmp_path / "other-tokenizer"
    make_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _fails(command: list[str], capsys, run_dir: Path) -> dict[str, str]:
    """Run the CLI; it must fail at once with exit 2, write nothing, and print one line per
    problem. Returns {recipe key: message}."""
    began = time.perf_counter()
    code = main(command)
    seconds = time.perf_counter() - began
    err = capsys.readouterr().err
    assert code == 2, err
    assert seconds < FEW_SECONDS, f"{seconds:.1f}s: {err}"
    assert not run_dir.exists(), "a stage started before the recipe was checked"
    assert "Traceback" not in err
    prefix = f"lmdistill {command[0]}: error: {command[1]}: "
    problems = {}
    for line in err.strip().splitlines():
        assert line.startswith(prefix), err
        key, _, message = line.removeprefix(prefix).partition(": ")
        problems[key] = message
    return problems


def test_the_base_recipe_passes_every_check(recipe: Path, capsys):
    assert main(["run", str(recipe), "--dry-run"]) == 0
    assert "would run (new)" in capsys.readouterr().out


CASES = {
    # task specs parse and name known tasks
    "eval task typo": (
        ["eval.tasks=[arithmetic_1digit, arithmetc_1digit]"],
        "eval.tasks.1",
        "unknown task 'arithmetc_1digit' (did you mean arithmetic_1digit?)",
    ),
    "prompts task typo": (
        ["prompts.path=null", "prompts.task=gsm_symblic"],
        "prompts.task",
        "(did you mean gsm_symbolic?)",
    ),
    "filter task": (["filter.task=jsonl:{tmp}/missing.jsonl"], "filter.task", "missing.jsonl"),
    "prompts template": (["prompts.template=step_by_stp"], "prompts.template", "step_by_stp"),
    # model and teacher specs resolve
    "teacher dir": (["teacher={tmp}/no-model"], "teacher", "no such model dir"),
    "teacher url": (["teacher=http://:8000/v1"], "teacher", "not a well-formed URL"),
    "teacher option": (["teacher_options.concurrency=4"], "teacher", "option(s) concurrency"),
    "compare model": (["eval.compare.sft={tmp}/no-sft"], "eval.compare.sft", "no such model dir"),
    "compare role": (["eval.compare.teacher={tiny}"], "eval.compare.teacher", "role name"),
    # a student built from the teacher fits its config
    "student layers": (
        ["train.student.from_teacher.layers=3"],
        "train.student.from_teacher.layers",
        "a student from a 2-layer teacher needs 1..2 layers, got 3",
    ),
    "student layer list": (
        ["train.student.from_teacher.layers=[0, 0]"],
        "train.student.from_teacher.layers",
        "repeat a teacher layer",
    ),
    "student width": (
        ["train.student.from_teacher.hidden_size=30"],
        "train.student.from_teacher.hidden_size",
        "multiple of the 4 attention heads",
    ),
    "layer map": (
        ["train.objectives=[{kind: logits}, {kind: hidden, layer_map: {0: 5}}]"],
        "train.objectives.1.layer_map",
        "not a teacher layer",
    ),
    "vocabulary": (
        ["train.student={model: {other}}"],
        "train.teacher.model",
        "different tokenizers",
    ),
    # input paths exist and their first record parses
    "prompts file": (["prompts.path={tmp}/missing.jsonl"], "prompts.path", "no such file"),
    "prompts record": (["prompts.path={tmp}/bad_prompts.jsonl"], "prompts.path", ":1:"),
    "data record": (
        ["generate=null", "eval.held_out=false", "train.data.path={tmp}/bad_data.jsonl"],
        "train.data.path",
        "no assistant turn",
    ),
    "eval data file": (
        ["train.data.eval_path={tmp}/missing.jsonl"],
        "train.data.eval_path",
        "no such file",
    ),
    "launch config": (
        ["launch={num_processes: 2, config_file: {tmp}/missing.yaml}"],
        "launch.config_file",
        "no such accelerate config",
    ),
    # option combinations the stages refuse
    "uld with logits": (
        ["train.objectives=[{kind: logits}, {kind: uld}]"],
        "train.objectives",
        "cannot be combined with logits",
    ),
    "on-policy under FSDP": (
        [
            "launch={num_processes: 2, config_file: {tmp}/fsdp.yaml}",
            "train.batch.micro_batches_per_step=2",
            "train.on_policy={lambda: 0.5}",
        ],
        "train.on_policy",
        "not supported with FSDP",
    ),
    "deepspeed": (
        ["launch={num_processes: 2, config_file: {tmp}/deepspeed.yaml}"],
        "launch.config_file",
        "DeepSpeed is not supported",
    ),
    "batch per process": (
        ["launch={num_processes: 2}", "train.batch.micro_batches_per_step=3"],
        "train.batch.micro_batches_per_step",
        "multiple of the 2 training processes",
    ),
    "batch tokens": (
        ["train.batch.tokens_per_micro_batch=32"],
        "train.batch.tokens_per_micro_batch",
        "data.max_length (64)",
    ),
    "teacher-relative task without the teacher": (
        ["eval.teacher=false", "eval.held_out=false", "eval.tasks=[rel]"],
        "eval.tasks.0",
        "compares against the teacher",
    ),
    "nothing to evaluate": (["eval.held_out=false", "eval.tasks=[]"], "eval.tasks", "at least one"),
    "logit KD from a text-only teacher": (
        ["teacher=http://127.0.0.1:9/v1"],
        "train.objectives.0",
        "cannot give full_logits",
    ),
    "multiple choice with a text-only teacher": (
        [
            "teacher=http://127.0.0.1:9/v1",
            "train.objectives=[{kind: sft}]",
            "eval.tasks=[mc-builtin]",
        ],
        "eval.tasks.0",
        "cannot give full_logits",
    ),
    "cache from a text-only teacher": (
        ["teacher=http://127.0.0.1:9/v1", "cache_logits={top_k: 4}"],
        "cache_logits",
        "cannot give full_logits",
    ),
    # API keys are present when an API teacher is named
    "API key": (
        ["teacher=openai:gpt-4o-mini", "train.objectives=[{kind: sft}]"],
        "teacher",
        "set $OPENAI_API_KEY",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_broken_recipe_fails_at_once_naming_the_key(
    case, recipe: Path, tiny_model_dir: Path, other_tokenizer_dir: Path, monkeypatch, capsys
):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    overrides, key, words = CASES[case]
    fill = {
        "tmp": str(recipe.parent),
        "tiny": str(tiny_model_dir),
        "other": str(other_tokenizer_dir),
    }
    overrides = [o.replace("{tmp}", fill["tmp"]).replace("{tiny}", fill["tiny"]) for o in overrides]
    overrides = [o.replace("{other}", fill["other"]) for o in overrides]
    problems = _fails(["run", str(recipe), *overrides], capsys, recipe.parent / "run")
    assert key in problems, problems
    assert words in problems[key]


@pytest.mark.parametrize(
    ("overrides", "task"),
    [
        ([], "rel-jsonl"),
        (["eval.teacher=false"], "ref-jsonl"),
        (["teacher=http://127.0.0.1:9/v1", "train.objectives=[{kind: sft}]"], "ref-jsonl"),
    ],
    ids=["teacher", "teacher-off", "text-only-teacher"],
)
def test_held_out_prompts_compare_with_the_teachers_answers_when_its_logits_are_not_there(
    recipe: Path, overrides, task
):
    """eval.held_out with the teacher off, or with a text-only teacher (an API), compares the
    student with the teacher's answers in the file (ROUGE-L, perplexity): issue 16's api_sft."""
    from lmdistill.pipelines.run import Paths, held_out_task, load_recipe

    loaded = load_recipe(recipe, overrides)  # passes every check
    assert held_out_task(loaded, Paths(Path(loaded.run_dir))).startswith(f"{task}:")


def test_every_problem_is_reported_each_on_its_own_line(recipe: Path, capsys):
    overrides = [
        "eval.tasks=[arithmetc_1digit]",
        "train.student.from_teacher.layers=3",
        f"prompts.path={recipe.parent}/missing.jsonl",
    ]
    problems = _fails(["run", str(recipe), *overrides], capsys, recipe.parent / "run")
    assert set(problems) == {"eval.tasks.0", "train.student.from_teacher.layers", "prompts.path"}


def test_dry_run_runs_the_same_checks_and_exits_2(recipe: Path, capsys):
    problems = _fails(
        ["run", str(recipe), "train.student.from_teacher.layers=3", "--dry-run"],
        capsys,
        recipe.parent / "run",
    )
    assert list(problems) == ["train.student.from_teacher.layers"]


def test_an_api_key_is_never_printed(recipe: Path, monkeypatch, capsys):
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("MY_KEY", secret)
    overrides = [
        "teacher=openai:gpt-4o-mini",
        "teacher_options.api_key_env=MY_KEY",
        "teacher_options.concurrency=4",
    ]
    assert main(["run", str(recipe), *overrides, "--dry-run"]) == 2  # logits from an API
    out, err = capsys.readouterr()
    assert "train.objectives.0" in err
    assert secret not in out + err


def test_train_checks_its_recipe_before_loading_anything(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch, capsys
):
    """`lmdistill train`: the same checks, keyed without the `train.` of a run recipe; the
    process count and FSDP come from `accelerate launch`'s environment."""
    raw = {
        "run_dir": str(tmp_path / "run"),
        "student": {"from_teacher": {"teacher": str(tiny_model_dir), "layers": 3}},
        "teacher": {"model": str(tiny_model_dir)},
        "data": {"path": str(tmp_path / "missing.jsonl"), "max_length": 64},
        "batch": {"tokens_per_micro_batch": 128},
        "objectives": [{"kind": "logits"}],
        "on_policy": {"lambda": 0.5},
    }
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    problems = _fails(["train", str(path)], capsys, tmp_path / "run")
    assert set(problems) == {
        "student.from_teacher.layers",
        "data.path",
        "batch.micro_batches_per_step",
        "on_policy",
    }


def test_self_distill_checks_its_recipe_before_round_0(tmp_path: Path, capsys):
    raw = {
        "run_dir": str(tmp_path / "run"),
        "model": str(tmp_path / "no-model"),
        "task": "arithmetic_1digt",
        "scorer": "reward:no_such_module_15:score",
        "train": {"max_length": 512, "batch": {"tokens_per_micro_batch": 256}},
    }
    path = tmp_path / "self.yaml"
    path.write_text(yaml.safe_dump(raw))
    problems = _fails(["self-distill", str(path), "--dry-run"], capsys, tmp_path / "run")
    assert set(problems) == {"model", "task", "scorer", "train.batch.tokens_per_micro_batch"}
    assert "(did you mean arithmetic_1digit?)" in problems["task"]
