"""`lmdistill run`: stages in order on tiny models, fingerprints (a rerun skips everything, a
changed setting re-runs that stage and what follows), `--from`, `--dry-run`, clear recipe errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lmdistill.cli import main
from lmdistill.errors import UserError
from lmdistill.pipelines.run import decide, fingerprints, load_recipe, plan, run_recipe


def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": f"What is {i} + {i}?", "split": "test" if i % 4 == 0 else "train"}
        for i in range(12)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(tmp_path: Path, model: Path, **changes) -> Path:
    raw = {
        "run_dir": str(tmp_path / "run"),
        "teacher": str(model),
        "prompts": {"path": str(_prompts(tmp_path))},
        "generate": {"max_tokens": 4},
        "train": {
            "student": {"model": str(model)},
            "data": {"split": "train", "max_length": 64, "eval_fraction": 0},
            "batch": {"tokens_per_micro_batch": 128},
            "objectives": [{"kind": "sft"}],
            "optim": {"steps": 2},
            "log": {"progress": False, "tensorboard": False},
        },
        "eval": {"held_out": True, "limit": 3, "max_tokens": 4, "measure_cost": False},
    }
    raw.update(changes)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _status(result) -> dict[str, str]:
    return {row.name: row.status for row in result.stages}


def test_run_twice_skips_every_stage_and_a_change_reruns_what_follows(tmp_path, tiny_model_dir):
    path = _recipe(tmp_path, tiny_model_dir)
    first = run_recipe(load_recipe(path), source=str(path), log=None)
    stages = ["prompts", "generate", "train", "eval", "report"]
    assert [row.name for row in first.stages] == stages
    assert set(_status(first).values()) == {"ran"}
    run = tmp_path / "run"
    assert (run / "train" / "final" / "config.json").exists()
    report = json.loads((run / "report" / "report.json").read_text())
    assert any(name.startswith("rel-jsonl:") for name in report["tasks"])
    held_out = [json.loads(line) for line in (run / "held_out.jsonl").read_text().splitlines()]
    assert len(held_out) == 3 and all(r["split"] == "test" for r in held_out)

    again = run_recipe(load_recipe(path), source=str(path), log=None)
    assert set(_status(again).values()) == {"skipped (unchanged)"}

    changed = run_recipe(load_recipe(path, ["generate.max_tokens=5"]), source=str(path), log=None)
    assert _status(changed) == {
        "prompts": "skipped (unchanged)",
        "generate": "ran",
        "train": "ran",
        "eval": "ran",
        "report": "ran",
    }
    meta = json.loads((run / "responses.jsonl.meta.json").read_text())
    assert meta["sampling"]["max_tokens"] == 5  # re-made from scratch, not appended to

    forced = run_recipe(
        load_recipe(path, ["generate.max_tokens=5"]), start="eval", source=str(path), log=None
    )
    assert _status(forced)["train"] == "skipped (unchanged)"
    assert _status(forced)["eval"] == _status(forced)["report"] == "ran"


def test_a_changed_user_file_changes_the_fingerprints_downstream(tmp_path, tiny_model_dir):
    path = _recipe(tmp_path, tiny_model_dir)
    recipe = load_recipe(path)
    before = fingerprints(plan(recipe))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(prompts.read_text() + json.dumps({"prompt": "one more"}) + "\n")
    after = fingerprints(plan(recipe))
    assert all(before[name] != after[name] for name in before)


def test_an_interrupted_stage_resumes_and_later_stages_rerun(tmp_path, tiny_model_dir):
    recipe = load_recipe(_recipe(tmp_path, tiny_model_dir))
    stages = plan(recipe)
    prints = fingerprints(stages)
    state = {name: {"fingerprint": fp, "status": "done"} for name, fp in prints.items()}
    for stage in stages:
        stage.outputs[0].parent.mkdir(parents=True, exist_ok=True)
        stage.outputs[0].touch()
    state["train"]["status"] = "running"
    actions = decide(stages, prints, state, None)
    assert actions == {
        "prompts": "skip",
        "generate": "skip",
        "train": "resume",
        "eval": "run",
        "report": "run",
    }
    assert decide(stages, prints, state, "generate")["generate"] == "run"


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path, tiny_model_dir, capsys):
    path = _recipe(tmp_path, tiny_model_dir)
    assert main(["run", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for stage in ("prompts", "generate", "train", "eval", "report"):
        assert stage in out
    assert "would run (new)" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"generat": {}}, "generat: unknown key"),
        ({"filter": {"keep": "best"}}, "filter.task: required"),
        ({"generate": {"n": 4}}, "n > 1 needs temperature > 0"),
        (
            {"prompts": {"task": "tool_use"}, "generate": {"tools": ["search"]}},
            "generate.tools: unknown tool 'search'",
        ),
        (
            {"train": {"objectives": [{"kind": "sft"}], "student": {}}},
            "train.student: give exactly one of",
        ),
    ],
)
def test_bad_recipes_are_one_line_errors_naming_the_key(tmp_path, tiny_model_dir, change, message):
    path = _recipe(tmp_path, tiny_model_dir, **change)
    with pytest.raises(UserError, match=message) as info:
        load_recipe(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_cli_reports_a_bad_recipe_without_a_traceback(tmp_path, tiny_model_dir, capsys):
    path = _recipe(tmp_path, tiny_model_dir, prompts={"path": "a", "task": "b"})
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmdistill run: error:") and "prompts" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_the_train_stage_launches_two_processes_with_accelerate(tmp_path, tiny_model_dir):
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": f"What is {i} + {i}?", "response": f"It is {2 * i}."} for i in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = yaml.safe_load(_recipe(tmp_path, tiny_model_dir).read_text())
    del raw["teacher"], raw["prompts"], raw["generate"], raw["eval"]
    raw["train"]["data"] = {"path": str(data), "max_length": 64, "eval_fraction": 0}
    raw["train"]["batch"]["micro_batches_per_step"] = 2
    raw["launch"] = {"num_processes": 2}
    path = tmp_path / "launch.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = run_recipe(load_recipe(path), source=str(path), log=None)
    assert _status(result) == {"train": "ran"}
    records = (tmp_path / "run" / "train" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(records[0])["info"]["processes"] == 2
    assert (tmp_path / "run" / "train" / "final" / "config.json").exists()


@pytest.fixture(scope="module")
def long_context_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with 4,096 positions, enough for the tool prompt (rotary positions: no
    weight depends on the limit)."""
    from tiny import save_tiny_model_dir

    path = save_tiny_model_dir(tmp_path_factory.mktemp("tiny-long"))
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 4096
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("mode", ["reasoning", "tools"])
def test_task_prompts_generate_and_filter(tmp_path, tiny_model_dir, long_context_model_dir, mode):
    """The skill stages on a tiny model: task prompts (template applied), n samples or tool-loop
    traces, and the filter's statistics; a tiny model solves nothing, so nothing is kept."""
    raw = {
        "run_dir": str(tmp_path / "run"),
        "teacher": str(long_context_model_dir if mode == "tools" else tiny_model_dir),
        "prompts": {"task": "arithmetic_1digit", "limit": 3, "template": "step_by_step"},
        "generate": {"temperature": 1.0, "max_tokens": 6, "n": 2},
        "filter": {"keep": "all"},
    }
    if mode == "tools":
        raw["prompts"] = {"task": "tool_use", "limit": 3}
        raw["generate"] = {"max_tokens": 6, "tools": ["calculator"], "max_turns": 2}
    path = tmp_path / "skills.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = run_recipe(load_recipe(path), source=str(path), log=None)
    assert _status(result) == {"prompts": "ran", "generate": "ran", "filter": "ran"}
    run = tmp_path / "run"
    prompts = [json.loads(line) for line in (run / "prompts.jsonl").read_text().splitlines()]
    responses = (run / "responses.jsonl").read_text().splitlines()
    assert len(prompts) == 3 and all("reference" in p for p in prompts)
    assert len(responses) == (6 if mode == "reasoning" else 3)
    stats = json.loads((run / "filtered.stats.json").read_text())
    assert stats and (run / "filtered.jsonl").read_text() == ""
    again = run_recipe(load_recipe(path), source=str(path), log=None)
    assert set(_status(again).values()) == {"skipped (unchanged)"}


def test_failed_tool_traces_fail_the_generate_stage_and_are_listed(tmp_path, tiny_model_dir):
    """`tools: []` (all tools) runs the tool loop; a trace the teacher could not make (here the
    prompt is longer than the 256 positions) is not in responses.jsonl but listed beside it, and
    the stage fails so that the next run retries it."""
    raw = {
        "run_dir": str(tmp_path / "run"),
        "teacher": str(tiny_model_dir),
        "prompts": {"task": "tool_use", "limit": 3},
        "generate": {"max_tokens": 4, "tools": []},
    }
    path = tmp_path / "tools.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match=r"3 tool-use traces failed .*run again to retry them"):
        run_recipe(load_recipe(path), source=str(path), log=None)
    run = tmp_path / "run"
    assert (run / "responses.jsonl").read_text() == ""
    listed = (run / "responses.jsonl.failed.jsonl").read_text().splitlines()
    assert [json.loads(line)["status"] for line in listed] == ["generation_failed"] * 3
    assert json.loads((run / "responses.jsonl.meta.json").read_text())["tools"] == [
        "calculator",
        "convert_units",
        "lookup",
    ]


def test_a_tool_use_recipe_evaluates_the_tool_loop_as_an_eval_task(
    tmp_path, tiny_model_dir, monkeypatch
):
    """With generate.tools, the eval stage hands evaluate() a `tool-use` task with the recipe's
    task, tools and turns (so the report, retention and cache treat it like any task)."""
    from lmdistill.eval import runner
    from lmdistill.eval.results import EvalResults
    from lmdistill.pipelines.run import Paths, run_eval

    path = _recipe(
        tmp_path,
        tiny_model_dir,
        prompts={"task": "tool_use", "limit": 3},
        generate={"max_tokens": 6, "tools": ["calculator"], "max_turns": 2},
        eval={"tasks": ["arithmetic_1digit"], "limit": 2, "measure_cost": False},
    )
    calls = []

    def fake_evaluate(model, tasks, **kwargs):
        calls.append(tasks)
        return EvalResults(models={}, tasks=[], settings={})

    monkeypatch.setattr(runner, "evaluate", fake_evaluate)
    recipe = load_recipe(path)
    run_eval(recipe, Paths(tmp_path / "run"))
    assert calls == [["tool-use:tools=calculator:turns=2", "arithmetic_1digit"]]
    assert runner.make_evaluator(calls[0][0]).tools.names == ["calculator"]

    alone = load_recipe(path, ["eval.tasks=[]", "generate.tools=[]", "generate.max_turns=4"])
    run_eval(alone, Paths(tmp_path / "run"))  # the tool loop alone is a task list
    assert calls[-1] == ["tool-use"]


def test_held_out_with_the_teacher_off_compares_with_its_answers(tmp_path, tiny_model_dir):
    """eval.held_out with eval.teacher false (as with a text-only API teacher): the eval stage
    scores the student against the teacher's answers in held_out.jsonl, with no teacher model."""
    path = _recipe(tmp_path, tiny_model_dir)
    recipe = load_recipe(path, ["eval.teacher=false"])
    result = run_recipe(recipe, source=str(path), log=None)
    assert set(_status(result).values()) == {"ran"}
    report = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    (name,) = [n for n in report["tasks"] if n.startswith("ref-jsonl:")]
    assert list(report["models"]) == ["student"]
    task = report["tasks"][name]
    assert (task["metric"], task["n"]) == ("rouge_l", 3)  # eval.limit held-out prompts
    assert set(task["metrics"]) == {"rouge_l", "perplexity"}  # no KL or agreement
    assert task["details"]["student"]["reference"] == "file"


def test_a_teacher_server_that_is_not_there_is_named_as_unreachable(tmp_path, tiny_model_dir):
    """`lmdistill run` tells a server that is down from prompts that failed, as `lmdistill
    generate` does (one diagnosis, in the pipeline both call)."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    path = _recipe(
        tmp_path,
        tiny_model_dir,
        teacher=f"http://127.0.0.1:{port}/v1",
        teacher_options={"model": "m", "max_retries": 0, "timeout_s": 2},
    )
    with pytest.raises(UserError, match=f"cannot reach teacher .*127.0.0.1:{port}"):
        run_recipe(load_recipe(path), source=str(path), log=None)


def test_a_changed_stage_says_what_changed(tmp_path, tiny_model_dir, capsys):
    path = _recipe(tmp_path, tiny_model_dir)
    run_recipe(load_recipe(path), source=str(path), log=None)
    assert main(["run", str(path), "generate.max_tokens=5", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would run (changed: max_tokens)" in out  # the generate stage
    assert "would run (changed: generate)" in out  # train, which reads its output
