"""`tool-use` as an evaluation task: the spec, the four metrics with per-example values and
traces as records, the result cache (a second run does not run the tool loop), bad specs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_fakes import ScriptedTeacher
from tiny import save_tiny_model_dir

from lmdistill.data import Message
from lmdistill.errors import UserError
from lmdistill.eval import tool_use as tool_use_eval
from lmdistill.eval.base import EvalSettings
from lmdistill.eval.runner import evaluate, make_evaluator
from lmdistill.eval.tool_use import ToolUseEval, ToolUseSpec
from lmdistill.skills.tool_use import TOOL_METRIC_NAMES

SPEC = "tool-use:tools=calculator+convert_units+lookup"


@pytest.fixture(scope="module")
def long_context_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with 4,096 positions: the tool prompt is ~1,900 tiny-BPE tokens, more than
    the fixture's 256 (rotary positions: no weight depends on the limit)."""
    path = save_tiny_model_dir(tmp_path_factory.mktemp("tiny-long"))
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 4096
    (path / "config.json").write_text(json.dumps(config))
    return path


def oracle(evaluator: ToolUseEval, settings: EvalSettings) -> ScriptedTeacher:
    """Makes the expected call, then answers with the tool's result, except on every other
    example, where it answers 0 (a valid call, a wrong answer)."""
    examples = evaluator.task.examples(split="test", limit=settings.limit, seed=settings.seed)
    position = {ex.messages[-1]["content"]: i for i, ex in enumerate(examples)}

    def respond(messages: list[Message], sample: int) -> str:
        index = position[next(m["content"] for m in messages if m["role"] == "user")]
        last = messages[-1]["content"]
        if last.startswith("<tool_response>"):
            return "Answer: 0" if index % 2 else f"Answer: {last.splitlines()[1]}"
        body = json.dumps(examples[index].metadata["expected_call"])
        return f"<tool_call>\n{body}\n</tool_call>"

    return ScriptedTeacher(respond)


def test_the_four_metrics_come_back_per_example_with_the_traces():
    evaluator = make_evaluator(SPEC)
    assert isinstance(evaluator, ToolUseEval) and evaluator.max_turns == 4
    settings = EvalSettings(limit=4)
    result = evaluator.run(oracle(evaluator, settings), settings)
    assert result.primary == "final_answer_accuracy"
    assert set(result.metrics) == set(TOOL_METRIC_NAMES)
    for name in ("call_validity", "tool_name_accuracy", "argument_accuracy"):
        assert result.metrics[name].value == 1.0
    assert result.per_example == [1.0, 0.0, 1.0, 0.0]
    assert result.metrics["final_answer_accuracy"].value == 0.5
    assert result.metrics["final_answer_accuracy"].n == 4
    assert result.metrics["final_answer_accuracy"].method == "wilson"
    assert len(set(result.example_ids)) == 4
    record = result.records[0]
    assert record["id"] == result.example_ids[0] and record["status"] == "ok"
    assert [m["role"] for m in record["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert record["final_answer_accuracy"] == 1.0 and record["expected_call"]["name"]
    assert result.details["ended_ok"] == 4 and result.details["max_turns"] == 4


def test_the_result_counts_the_tokens_of_every_turn(monkeypatch):
    """Prompt and completion tokens are the sums over the traces' turns (the cost section's
    input), not 0."""
    traces = []
    real = tool_use_eval.run_tool_loops

    def keeping(*args, **kwargs):
        traces.extend(real(*args, **kwargs))
        return traces

    monkeypatch.setattr(tool_use_eval, "run_tool_loops", keeping)
    evaluator = make_evaluator(SPEC)
    settings = EvalSettings(limit=3)
    result = evaluator.run(oracle(evaluator, settings), settings)
    usages = [t["usage"] for t in traces]
    assert len(usages) == 3
    for t in traces:  # ScriptedTeacher counts words: the call turn, then the answer turn
        call = f"<tool_call>\n{json.dumps(t['metadata']['expected_call'])}\n</tool_call>"
        answer = t["messages"][-1]["content"]
        assert t["usage"]["completion_tokens"] == len(call.split()) + len(answer.split())
    assert result.prompt_tokens == sum(u["prompt_tokens"] for u in usages) > 0
    assert result.completion_tokens == sum(u["completion_tokens"] for u in usages) > 0


def test_the_result_is_cached_and_a_second_run_runs_no_tool_loop(
    long_context_model_dir, tmp_path, monkeypatch
):
    loops = []
    real = tool_use_eval.run_tool_loops

    def counting(*args, **kwargs):
        loops.append(kwargs["max_turns"])
        return real(*args, **kwargs)

    monkeypatch.setattr(tool_use_eval, "run_tool_loops", counting)

    def run():
        return evaluate(
            str(long_context_model_dir),
            ["tool-use:tools=calculator:turns=2"],
            settings=EvalSettings(limit=2, max_tokens=4),
            cache_dir=tmp_path / "cache",
            measure_cost=False,
            log=None,
        )

    first = run().tasks[0]
    assert first.kind == "tool_use" and loops == [2]
    student = first.results["student"]
    assert set(student.metrics) == set(TOOL_METRIC_NAMES) and len(student.per_example) == 2
    assert all(value in (0.0, 1.0) for value in student.per_example)
    assert len(student.records) == 2 and not student.cached
    assert "ended_generation_failed" not in student.details  # the model itself answered

    second = run()
    assert loops == [2]  # answered from the cache
    assert second.settings["model_loads"] == {"student": 0}
    cached = second.tasks[0].results["student"]
    assert cached.cached and cached.metrics == student.metrics
    assert cached.records == student.records

    from lmdistill.eval.report import write_report

    written = write_report(second, tmp_path / "report")
    assert "final_answer_accuracy" in written["markdown"].read_text()
    samples = (tmp_path / "report" / "samples" / "student").glob("tool-use*.jsonl")
    assert [len(path.read_text().splitlines()) for path in samples] == [2]


def test_the_spec_reads_task_tools_and_turns_in_any_order():
    assert ToolUseSpec.parse("tool-use") == ToolUseSpec("tool_use", (), 4)
    parsed = ToolUseSpec.parse("tool-use:tool_use:turns=2:tools=lookup+calculator")
    assert parsed == ToolUseSpec("tool_use", ("lookup", "calculator"), 2)
    assert str(parsed) == "tool-use:tools=lookup+calculator:turns=2"
    assert ToolUseSpec.parse(str(parsed)) == parsed
    assert (
        ToolUseSpec.parse("tool-use:jsonl:qa.jsonl@number:turns=3").task == "jsonl:qa.jsonl@number"
    )
    evaluator = make_evaluator("tool-use:tools=lookup+calculator")
    assert evaluator.tools.names == ["lookup", "calculator"]


def test_the_settings_that_change_results_change_the_identity():
    identities = [
        make_evaluator(spec).identity()
        for spec in ("tool-use", "tool-use:tools=calculator", "tool-use:turns=2")
    ]
    assert identities[0]["max_turns"] == 4 and identities[2]["max_turns"] == 2
    assert len(identities[0]["tools"]) == 3 and len(identities[1]["tools"]) == 1


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tool-use:tools=calculator+search", "unknown tool 'search'"),
        ("tool-use:turns=0", "turns= needs a whole number"),
        ("tool-use:tools=", "tools= needs tool names"),
        ("tool-use:turns=2:turns=3", "'turns=' given twice"),
        ("tool-use:no_such_task", "unknown task 'no_such_task'"),
        ("tool-use:turn=3", "unknown option 'turn='; options: tools=, turns="),
        ("tool-use:tools=lookup:tool=x", "unknown option 'tool='"),
    ],
)
def test_a_bad_spec_is_a_one_line_error_naming_it(spec, message):
    with pytest.raises(UserError, match=message) as info:
        make_evaluator(spec)
    assert spec in str(info.value) and "\n" not in str(info.value)
