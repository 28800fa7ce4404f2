"""`evaluate` end to end on tiny models: every task kind together, retention, and the cache (a
second run loads no model and generates nothing)."""

import json
import shutil

import pytest
from tiny import save_tiny_model_dir

from lmdistill.errors import UserError
from lmdistill.eval import runner
from lmdistill.eval.base import EvalSettings
from lmdistill.eval.cache import dir_fingerprint
from lmdistill.eval.cost import dir_size
from lmdistill.eval.report import cost_table
from lmdistill.eval.runner import evaluate, parse_tasks, retention
from lmdistill.eval.stats import retention_interval
from lmdistill.teachers.registry import load_teacher

FAKE_COST = {
    "params_total": 1000,
    "params_non_embedding": 600,
    "disk_bytes": 4000,
    "model_memory_bytes": 10_000,
    "latency_per_token_s": 0.01,
    "tokens_per_s": 100.0,
}


@pytest.fixture
def data_files(tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(
        "".join(
            json.dumps({"prompt": f"What is {i} + 1?", "answer": i + 1}) + "\n" for i in range(4)
        )
    )
    mc = tmp_path / "mc.jsonl"
    mc.write_text(
        "".join(
            json.dumps({"question": f"Pick {c}.", "choices": ["a", "b", "c"], "answer": c}) + "\n"
            for c in "abca"
        )
    )
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Hello", "Hi there")))
    return [f"jsonl:{qa}", f"mc-jsonl:{mc}", f"rel-jsonl:{held_out}"]


@pytest.fixture
def counted(monkeypatch):
    """Counts model loads, generate calls and cost measurements made by `evaluate`."""
    counts = {"loads": 0, "generate_calls": 0, "measure": 0}
    models = []

    def counting_load(spec, **options):
        counts["loads"] += 1
        model = load_teacher(spec, **options)
        models.append(model)
        return model

    def fake_measure_models(specs, **kwargs):
        counts["measure"] += len(specs)
        conditions = {"rounds": 5, "load_average_before": 0.1, "load_average_after": 0.1}
        return {"models": {role: dict(FAKE_COST) for role in specs}, "conditions": conditions}

    monkeypatch.setattr(runner, "load_teacher", counting_load)
    monkeypatch.setattr(runner.cost_module, "measure_models", fake_measure_models)
    counts["models"] = models
    return counts


def run(data_files, teacher, student, cache_dir, **kwargs):
    return evaluate(
        str(student),
        data_files,
        teacher=str(teacher),
        baseline=str(teacher),
        settings=EvalSettings(max_tokens=4, **kwargs),
        cache_dir=cache_dir,
        log=None,
    )


def test_second_run_is_answered_from_the_cache(
    data_files, tiny_model_dir, tiny_student_dir, tmp_path, counted
):
    first = run(data_files, tiny_model_dir, tiny_student_dir, tmp_path / "cache")
    generated = sum(m.generate_calls for m in counted["models"])
    assert counted["loads"] == 2  # teacher and student; the baseline is the teacher's dir
    assert generated > 0 and counted["measure"] == 2

    counted.update(loads=0, measure=0)
    second = run(data_files, tiny_model_dir, tiny_student_dir, tmp_path / "cache")
    assert counted["loads"] == 0 and counted["measure"] == 0  # nothing loaded: nothing generated
    assert sum(m.generate_calls for m in counted["models"]) == generated
    for a, b in zip(first.tasks, second.tasks, strict=True):
        for role in a.results:
            assert b.results[role].cached
            assert b.results[role].metrics == a.results[role].metrics
            assert b.results[role].records == a.results[role].records
    assert second.cost["models"]["student"]["params_total"] == 1000

    third = run(data_files, tiny_model_dir, tiny_student_dir, tmp_path / "cache", limit=2)
    assert counted["loads"] == 2  # other settings: computed again
    assert third.task(data_files[0]).results["student"].metrics["accuracy"].n == 2


def test_models_of_one_shape_are_timed_once(data_files, tiny_model_dir, tmp_path, counted):
    student = save_tiny_model_dir(tmp_path / "student", layers=1, seed=2)  # another shape
    twin = tmp_path / "twin"  # the student's shape under another name, with an extra file
    shutil.copytree(student, twin)
    config = json.loads((twin / "config.json").read_text())
    (twin / "config.json").write_text(json.dumps({**config, "_name_or_path": "elsewhere"}))
    (twin / "notes.txt").write_text("x" * 5000)
    results = evaluate(
        str(student),
        data_files[:1],
        teacher=str(tiny_model_dir),
        extra={"twin": str(twin)},
        settings=EvalSettings(max_tokens=4),
        log=None,
    )
    assert counted["measure"] == 2  # the teacher and the student; the twin is not timed
    models = results.cost["models"]
    assert models["twin"]["timed_as"] == "student" and "timed_as" not in models["student"]
    assert models["twin"]["latency_per_token_s"] == models["student"]["latency_per_token_s"]
    assert models["twin"]["disk_bytes"] == dir_size(twin)  # its own files, measured
    assert models["twin"]["disk_bytes"] != models["student"]["disk_bytes"]
    reduction = results.cost["reduction"]
    assert reduction["twin"]["latency_per_token"] == reduction["student"]["latency_per_token"]
    table = cost_table(results)
    assert table is not None and "twin as student" in table.note


def test_every_kind_reports_retention(data_files, tiny_model_dir, tiny_student_dir, counted):
    results = run(data_files, tiny_model_dir, tiny_student_dir, None)
    assert [t.kind for t in results.tasks] == ["generation", "multiple_choice", "teacher_relative"]
    rel = results.task(data_files[2])
    assert rel.results["baseline"].metrics["kl"].value == pytest.approx(0.0, abs=1e-6)
    assert rel.results["student"].metrics["kl"].value > 0
    mc = results.task(data_files[1])
    teacher, student = mc.results["teacher"], mc.results["student"]
    if sum(teacher.per_example) > 0:
        expected = retention_interval(student.per_example, teacher.per_example)
        assert mc.retention["student"].value == pytest.approx(expected.estimate)
    else:
        assert mc.retention["student"] is None
    assert results.settings["seeds"] == {"examples": 0, "sampling": None, "bootstrap": 0}
    assert results.models["student"].fingerprint == dir_fingerprint(tiny_student_dir)


def test_retention_pairs_examples_by_id():
    from lmdistill.eval.results import ModelTaskResult, Score

    def result(ids, scores):
        metric = Score(sum(scores) / len(scores), 0, 1, len(scores), "wilson")
        return ModelTaskResult("t", "m", "accuracy", {"accuracy": metric}, ids, scores)

    teacher = result(["a", "b", "c", "d"], [1.0, 1.0, 0.0, 1.0])
    student = result(["d", "c", "b", "a"], [0.0, 1.0, 1.0, 0.0])  # another order
    score = retention(student, teacher, 0.95, 0)
    assert score.value == pytest.approx((0 + 1 + 1 + 0) / (1 + 0 + 1 + 1))
    assert retention(student, result(["a", "b", "c", "d"], [0.0] * 4), 0.95, 0) is None


def test_fingerprint_follows_the_weights(tmp_path, tiny_model_dir):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    before = dir_fingerprint(copy)
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert dir_fingerprint(copy) != before


def test_task_errors_come_before_any_model_loads(counted):
    with pytest.raises(UserError, match=r"unknown task 'nope'.*mc-builtin"):
        evaluate("no-such-model", ["nope"], log=None)
    with pytest.raises(UserError, match="add --teacher"):
        evaluate("no-such-model", ["rel"], log=None)
    with pytest.raises(UserError, match="not found"):
        parse_tasks(["mc-jsonl:/no/such/file.jsonl"])
    assert counted["loads"] == 0
    assert [e.name for e in parse_tasks(["mc-builtin,arithmetic", "mc-builtin"])] == [
        "mc-builtin",
        "arithmetic",
    ]


def test_extra_models_are_evaluated_reported_and_given_retention(
    data_files, tiny_model_dir, tiny_student_dir, counted, tmp_path
):
    from lmdistill.eval.report import scores_table

    results = evaluate(
        str(tiny_student_dir),
        data_files[2:],
        teacher=str(tiny_model_dir),
        extra={"sft-only": str(tiny_model_dir), "untrained": str(tiny_student_dir)},
        settings=EvalSettings(max_tokens=4),
        log=None,
        measure_cost=False,
    )
    assert list(results.models) == ["teacher", "student", "sft-only", "untrained"]
    rel = results.task(data_files[2])
    assert rel.results["sft-only"].metrics["kl"].value == pytest.approx(0.0, abs=1e-6)
    assert rel.results["untrained"].metrics["kl"].value == pytest.approx(
        rel.results["student"].metrics["kl"].value
    )
    headers = scores_table(results).headers
    assert "sft-only" in headers and "retention (untrained/teacher)" in headers
    with pytest.raises(UserError, match="must not reuse"):
        evaluate(
            str(tiny_student_dir),
            data_files[2:],
            teacher=str(tiny_model_dir),
            extra={"baseline": str(tiny_model_dir)},
            log=None,
        )


def test_teacher_options_reach_the_teacher(data_files, tiny_student_dir):
    """A recipe's teacher_options (a local server's base_url) load the teacher; the student is
    loaded without them."""
    from faultserver import FaultServer

    with FaultServer() as server:
        results = evaluate(
            str(tiny_student_dir),
            data_files[:1],
            teacher="openai:fault",
            teacher_options={"base_url": server.base_url, "timeout_s": 5.0},
            settings=EvalSettings(max_tokens=4),
            measure_cost=False,
            log=None,
        )
        assert server.request_count > 0
    assert results.task(data_files[0]).results["teacher"].metrics["accuracy"].n == 4


def test_a_templated_task_asks_as_self_distill_does_and_caches_by_template(
    tiny_model_dir, tmp_path, monkeypatch
):
    """`template:NAME:TASK` sends the prompts `task_prompts` writes for sampling and training
    (the reasoning-gym question re-asked with the template's instruction), and another
    template is another cache entry."""
    from lmdistill.skills.reasoning import TEMPLATES, task_prompts
    from lmdistill.tasks import get_task

    sent, loads = [], []

    def recording_load(spec, **options):
        model = load_teacher(spec, **options)
        generate = model.iter_generate

        def iter_generate(conversations, params):
            sent.extend(conversations)
            return generate(conversations, params)

        model.iter_generate = iter_generate
        loads.append(spec)
        return model

    monkeypatch.setattr(runner, "load_teacher", recording_load)
    settings = EvalSettings(limit=3, max_tokens=4, seed=2)

    def run_spec(spec):
        return evaluate(
            str(tiny_model_dir),
            [spec],
            settings=settings,
            cache_dir=tmp_path / "cache",
            measure_cost=False,
            log=None,
        ).task(spec)

    first = run_spec("template:concise:arithmetic_1digit")
    expected = task_prompts(
        get_task("arithmetic_1digit"), split="test", limit=3, seed=2, template="concise"
    )
    assert sent == [p["messages"] for p in expected]
    instruction = TEMPLATES["concise"].instruction
    assert all(r["prompt"].endswith(instruction) for r in first.results["student"].records)
    assert first.kind == "generation" and first.results["student"].metrics["accuracy"].n == 3

    assert run_spec("template:concise:arithmetic_1digit").results["student"].cached
    assert len(loads) == 1  # answered from the cache
    other = run_spec("template:step_by_step:arithmetic_1digit")
    assert not other.results["student"].cached and len(loads) == 2
    assert sent[-1][-1]["content"].endswith(TEMPLATES["step_by_step"].instruction)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("template:nope:arithmetic_1digit", "unknown reasoning template 'nope'; choose one of"),
        ("template:concise:mc-builtin", "expected template:NAME:TASK with TASK a generation"),
        ("template:concise", "expected template:NAME:TASK"),
    ],
)
def test_a_bad_template_spec_is_one_line_naming_it_before_any_model_loads(counted, spec, message):
    with pytest.raises(UserError) as caught:
        evaluate("no-such-model", [f"arithmetic,{spec}"], log=None)
    text = str(caught.value)
    assert text.startswith(f"task '{spec}': ") and message in text and "\n" not in text
    assert counted["loads"] == 0
