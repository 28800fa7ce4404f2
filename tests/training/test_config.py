"""Recipes: typed config, overrides, clear one-line errors (lmdistill.training.config)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmdistill.errors import UserError
from lmdistill.training.config import (
    LogitsObjective,
    TrainConfig,
    apply_override,
    dump,
    load_config,
)

RECIPES = [  # the `lmdistill train` recipes (the others are checked in tests/test_recipes.py)
    path
    for path in sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))
    if path.read_text().startswith("# lmdistill train ")
]
MINIMAL = {
    "run_dir": "runs/x",
    "student": {"model": "some/dir"},
    "data": {"path": "d.jsonl"},
    "objectives": [{"kind": "sft"}],
}


def write(tmp_path: Path, raw: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates_and_opens_with_its_command(path: Path):
    config = load_config(path)
    assert isinstance(config, TrainConfig)
    first_lines = path.read_text().splitlines()[:4]
    assert f"# lmdistill train recipes/{path.name}" in first_lines


def test_overrides_set_dotted_keys_and_list_items(tmp_path: Path):
    path = write(
        tmp_path,
        {**MINIMAL, "objectives": [{"kind": "sft"}, {"kind": "logits"}], "teacher": {"model": "t"}},
    )
    config = load_config(
        path, ["optim.lr=3e-4", "objectives.1.temperature=2", "batch.packing=false", "seed=7"]
    )
    assert config.optim.lr == 3e-4 and config.seed == 7 and config.batch.packing is False
    assert (
        isinstance(config.objectives[1], LogitsObjective)
        and config.objectives[1].temperature == 2.0
    )


def test_precision_no_is_the_value_not_a_yaml_boolean(tmp_path: Path):
    """YAML reads a bare `no` as false; `precision: no` (file or override) means "no"."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MINIMAL) + "precision: no\n")
    assert load_config(path).precision == "no"
    assert load_config(write(tmp_path, MINIMAL), ["precision=no"]).precision == "no"
    with pytest.raises(UserError, match="precision: Input should be"):
        load_config(write(tmp_path, MINIMAL), ["precision=yes"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "r.yaml: optim.lrr: unknown key"),
        ("optim.lr=fast", "r.yaml: optim.lr: Input should be a valid number"),
        ("objectives.0.temperature=2", "r.yaml: objectives.0.temperature: unknown key"),
        ("objectives.0.kind=magic", "r.yaml: objectives.0: Input tag 'magic' found using 'kind'"),
        (
            "optim.warmup_steps=-1",
            "r.yaml: optim.warmup_steps: Input should be greater than or equal to 0",
        ),
        (
            "student.from_teacher={teacher: t, layers: 2}",
            "student: give exactly one of student.model and student.from_teacher",
        ),
    ],
)
def test_bad_keys_and_values_name_the_file_and_the_key(tmp_path: Path, override: str, message: str):
    with pytest.raises(UserError) as info:
        load_config(write(tmp_path, MINIMAL), [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_objectives_that_need_a_teacher_say_so(tmp_path: Path):
    raw = {**MINIMAL, "objectives": [{"kind": "hidden"}]}
    with pytest.raises(UserError, match=r"hidden-state KD needs teacher\.model"):
        load_config(write(tmp_path, raw))
    raw = {
        **MINIMAL,
        "objectives": [{"kind": "logits", "divergence": "reverse_kl"}],
        "teacher": {"cache": "c"},
    }
    with pytest.raises(UserError, match="reverse_kl is infinite against a top-k cache"):
        load_config(write(tmp_path, raw))


def test_malformed_overrides_and_yaml_are_user_errors(tmp_path: Path):
    with pytest.raises(UserError, match="expected key=value"):
        apply_override({}, "optim.lr")
    with pytest.raises(UserError, match="not an index"):
        apply_override({"objectives": [{}]}, "objectives.3.weight=1")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: [unclosed\n")
    with pytest.raises(UserError, match=r"bad.yaml:\d+"):
        load_config(bad)


def test_the_cli_reports_each_problem_of_a_bad_recipe_on_a_line_without_a_traceback(
    tmp_path: Path,
):
    path = write(tmp_path, {**MINIMAL, "optim": {"lr": "fast", "warmup": 3}})
    proc = subprocess.run(
        [sys.executable, "-m", "lmdistill", "train", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, proc.stderr
    prefix = f"lmdistill train: error: {path}: "
    assert lines[0].startswith(prefix + "optim.lr: Input should be a valid number")
    assert lines[1] == prefix + "optim.warmup: unknown key"


def test_on_policy_needs_an_online_teacher_and_a_logits_objective(tmp_path: Path):
    on_policy = {"lambda": 0.5, "max_new_tokens": 16}
    raw = {**MINIMAL, "objectives": [{"kind": "logits"}], "on_policy": on_policy}
    with pytest.raises(UserError, match=r"on_policy: needs teacher.model"):
        load_config(write(tmp_path, {**raw, "teacher": {"cache": "c"}}))
    with pytest.raises(UserError, match=r"on_policy: needs a logits objective"):
        load_config(
            write(tmp_path, {**raw, "teacher": {"model": "t"}, "objectives": [{"kind": "sft"}]})
        )
    with pytest.raises(UserError, match=r"only logits and hidden"):
        load_config(
            write(
                tmp_path,
                {
                    **raw,
                    "teacher": {"model": "t"},
                    "objectives": [{"kind": "logits"}, {"kind": "sft"}],
                },
            )
        )
    with pytest.raises(
        UserError, match=r"on_policy.lambda: Input should be less than or equal to 1"
    ):
        load_config(
            write(tmp_path, {**raw, "teacher": {"model": "t"}, "on_policy": {"lambda": 1.5}})
        )
    config = load_config(write(tmp_path, {**raw, "teacher": {"model": "t"}}))
    assert config.on_policy.lambda_ == 0.5 and config.on_policy.max_new_tokens == 16
    assert yaml.safe_load(dump(config))["on_policy"]["lambda"] == 0.5  # saved as written


def test_span_weights_are_optional_nonnegative_and_not_both_zero(tmp_path: Path):
    assert load_config(write(tmp_path, MINIMAL)).data.span_weights is None
    data = {"path": "d.jsonl", "span_weights": {"answer": 2.0}}
    weights = load_config(write(tmp_path, {**MINIMAL, "data": data})).data.span_weights
    assert (weights.reasoning, weights.answer) == (1.0, 2.0)
    for bad, message in [
        ({"answer": -1}, "data.span_weights.answer: Input should be greater than or equal to 0"),
        (
            {"answer": 0, "reasoning": 0},
            "data.span_weights: reasoning and answer weights are both 0",
        ),
        ({"final": 1}, "data.span_weights.final: unknown key"),
    ]:
        with pytest.raises(UserError, match=message):
            load_config(write(tmp_path, {**MINIMAL, "data": {"path": "d", "span_weights": bad}}))
