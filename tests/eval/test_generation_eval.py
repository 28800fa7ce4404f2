"""Verifiable generation and code pass@k over the Task shape, with scripted responses whose
scores the test knows."""

import json

import pytest
from eval_fakes import ScriptedTeacher

from lmdistill.errors import UserError
from lmdistill.eval.base import EvalSettings
from lmdistill.eval.generation import GenerationEval
from lmdistill.eval.stats import pass_at_k, wilson_interval
from lmdistill.tasks import get_task
from lmdistill.teachers.base import Failure, GenerationResult


@pytest.fixture
def qa_file(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [{"id": f"q{i}", "prompt": f"What is {i} + {i}?", "answer": 2 * i} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def answer_first_three(messages, sample):
    i = int(messages[-1]["content"].split()[2])
    return f"Let me think. Answer: {2 * i if i < 3 else 2 * i + 1}"


def test_accuracy_and_wilson_interval(qa_file):
    task = GenerationEval(f"jsonl:{qa_file}", get_task(f"jsonl:{qa_file}"))
    result = task.run(ScriptedTeacher(answer_first_three), EvalSettings())
    score = result.metrics["accuracy"]
    expected = wilson_interval(3, 5)
    assert (score.value, score.low, score.high, score.n) == (0.6, expected.low, expected.high, 5)
    assert score.method == "wilson"
    assert sorted(result.example_ids) == [f"q{i}" for i in range(5)]
    by_id = dict(zip(result.example_ids, result.per_example, strict=True))
    assert by_id == {"q0": 1.0, "q1": 1.0, "q2": 1.0, "q3": 0.0, "q4": 0.0}
    assert result.completion_tokens == 5 * 5  # "Let me think. Answer: N" is 5 words
    assert task.kind == "generation" and result.details["failed_requests"] == 0


class FailingTeacher(ScriptedTeacher):
    """Fails the request for conversation 0."""

    def iter_generate(self, conversations, params):
        for result in super().iter_generate(conversations, params):
            if result.index == 0:
                yield GenerationResult(0, failure=Failure("server_error", "boom", attempts=3))
            else:
                yield result


def test_a_failed_request_scores_zero_and_is_counted(qa_file):
    task = GenerationEval("qa", get_task(f"jsonl:{qa_file}"))
    result = task.run(FailingTeacher(lambda m, s: "Answer: 0"), EvalSettings())
    assert result.details["failed_requests"] == 1
    assert result.metrics["accuracy"].value == 0.0  # q0 (answer 0) failed; the rest are wrong
    assert "server_error" in next(r for r in result.records if r["id"] == "q0")["failure"]


def test_greedy_with_several_samples_is_refused():
    with pytest.raises(UserError, match="greedy"):
        EvalSettings(n_samples=4, temperature=0.0)
    assert EvalSettings(n_samples=4).resolved_temperature > 0
    assert EvalSettings().sampling().temperature == 0


def test_humaneval_pass_at_k_is_the_unbiased_estimate():
    task = get_task("humaneval")
    examples = task.examples(limit=3, seed=0)
    correct_samples = dict(
        zip((e.messages[-1]["content"] for e in examples), (5, 1, 0), strict=True)
    )
    canonical = {e.messages[-1]["content"]: e.metadata["canonical_solution"] for e in examples}

    def respond(messages, sample):
        content = messages[-1]["content"]
        return canonical[content] if sample < correct_samples[content] else "    return None\n"

    evaluator = GenerationEval("humaneval", task)
    result = evaluator.run(ScriptedTeacher(respond), EvalSettings(limit=3, n_samples=5))
    assert evaluator.kind == "code" and result.primary == "pass@1"
    assert result.metrics["pass@1"].value == pytest.approx((1 + 0.2 + 0) / 3)
    expected = sum(pass_at_k(5, c, 5) for c in (5, 1, 0)) / 3
    assert result.metrics["pass@5"].value == pytest.approx(expected) == pytest.approx(2 / 3)
    assert "pass@10" not in result.metrics  # k > n has no estimate


def test_a_template_asks_with_its_instruction_and_the_task_still_scores(qa_file):
    from lmdistill.skills.reasoning import TEMPLATES

    task = get_task(f"jsonl:{qa_file}")
    sent = []

    def respond(messages, sample):
        sent.append(messages)
        return answer_first_three(messages, sample)

    evaluator = GenerationEval("t", task, template="concise")
    result = evaluator.run(ScriptedTeacher(respond), EvalSettings())
    instruction = TEMPLATES["concise"].instruction
    assert len(sent) == 5 and all(m[-1]["content"].endswith(instruction) for m in sent)
    assert all(r["prompt"].endswith(instruction) for r in result.records)  # the prompt as sent
    assert result.metrics["accuracy"].value == 0.6  # graded by the task's own scorer
    plain = GenerationEval("t", task).identity()
    assert evaluator.identity()["template"]["instruction"] == instruction
    assert "template" not in plain and "split" not in plain  # plain tasks keep their cache keys


def test_a_generation_task_can_be_asked_on_its_train_split(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [
        {"prompt": f"What is {i} + {i}?", "answer": 2 * i, "split": s}
        for i, s in enumerate(["train", "test", "train"])
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = get_task(f"jsonl:{path}")
    evaluator = GenerationEval("t", task, split="train")
    result = evaluator.run(ScriptedTeacher(lambda m, s: "Answer: 0"), EvalSettings())
    assert len(result.example_ids) == 2 and evaluator.identity()["split"] == "train"
    with pytest.raises(UserError, match="task 't': unknown reasoning template 'nope'"):
        GenerationEval("t", task, template="nope")
