"""Reasoning prompts and the verification filter (lmdistill.skills.reasoning), on the real
`arithmetic_1digit` task with hand-written responses, right and wrong."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from lmdistill.errors import InputError, UserError
from lmdistill.skills.reasoning import (
    TEMPLATES,
    apply_template,
    filter_file,
    filter_traces,
    task_prompts,
)
from lmdistill.tasks import get_task
from lmdistill.tasks.base import Example
from lmdistill.tasks.extract import marked_answer
from lmdistill.teachers.base import Generation, GenerationResult, SamplingParams, Teacher


@pytest.fixture(scope="module")
def task():
    return get_task("arithmetic_1digit")


@pytest.fixture(scope="module")
def prompts(task):
    return task_prompts(task, limit=6, template="concise")


def solve(question: str) -> int:
    a, op, b = re.fullmatch(r"Calculate (-?\d+) ([-+*]) (-?\d+)\.", question).groups()
    return {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def sample(prompt: dict, k: int, response: str) -> dict:
    """A record as `generate` writes it: the prompt's fields carried through."""
    return {**prompt, "sample": k, "response": response, "finish_reason": "stop"}


def right(prompt: dict, working: str = "Working it out") -> str:
    return f"{working}.\nAnswer: {solve(prompt['metadata']['question'])}"


def wrong(prompt: dict) -> str:
    return f"I think so.\nAnswer: {solve(prompt['metadata']['question']) + 1}"


def test_every_template_asks_for_a_marked_answer_and_leaves_its_input_alone():
    messages = [{"role": "user", "content": "Calculate 2 + 3."}]
    for name in TEMPLATES:
        out = apply_template(messages, name)
        assert messages == [{"role": "user", "content": "Calculate 2 + 3."}]
        assert out[-1]["content"].startswith("Calculate 2 + 3.")
        assert any("'Answer: <answer>'" in m["content"] for m in out)
    assert apply_template(messages, "system")[0]["role"] == "system"
    with pytest.raises(UserError, match="unknown reasoning template 'nope'; choose one of"):
        apply_template(messages, "nope")


def test_task_prompts_replace_the_task_instruction_and_keep_what_the_scorer_needs(task, prompts):
    examples = {e.id: e for e in task.examples(split="train", limit=6)}
    assert [p["id"] for p in prompts] == list(examples)
    for prompt in prompts:
        example = examples[prompt["id"]]
        content = prompt["messages"][0]["content"]
        assert content.startswith(example.metadata["question"])
        assert content.count("Answer:") == 1  # the template's instruction, not the task's too
        assert prompt["reference"] == example.reference
        assert prompt["metadata"] == example.metadata
        assert prompt["task_messages"] == example.messages
    plain = task_prompts(task, limit=6)
    assert [p["messages"] for p in plain] == [e.messages for e in examples.values()]


def test_kept_traces_are_all_correct_by_the_task_scorer(task, prompts):
    records = [
        sample(p, k, response)
        for p in prompts
        for k, response in enumerate([wrong(p), right(p), right(p, "Adding up"), "no idea"])
    ]
    kept, stats = filter_traces(records, task, keep="all")
    assert len(kept) == 2 * len(prompts)
    for record in kept:
        example = Example(
            record["id"], record["task_messages"], record["reference"], record["metadata"]
        )
        assert task.score(example, record["response"]) == 1.0 == record["score"]
    assert all("sample" in r and "finish_reason" in r for r in kept)  # records pass through
    assert "score" not in records[0]  # the inputs are not modified
    assert stats.kept == len(kept) and stats.accepted == len(kept)


def test_keep_best_keeps_the_highest_score_per_prompt_and_skips_unsolved_prompts(task, prompts):
    records = [sample(p, k, r) for p in prompts[:3] for k, r in enumerate([wrong(p), right(p)])]
    records += [sample(prompts[3], 0, wrong(prompts[3]))]
    kept, stats = filter_traces(records, task, keep="best")
    assert [r["id"] for r in kept] == [p["id"] for p in prompts[:3]]
    assert [r["sample"] for r in kept] == [1, 1, 1]
    assert (stats.prompts, stats.accepted_prompts, stats.kept) == (4, 3, 3)

    # A graded scorer: the longest response wins; ties go to the earliest sample.
    def by_length(example: Example, response: str) -> float:
        return min(len(response) / 100, 1.0)

    graded = [sample(prompts[0], k, "x" * n) for k, n in enumerate([10, 30, 20, 30])]
    kept, _ = filter_traces(graded, task, keep="best", min_score=None, scorer=by_length)
    assert [r["sample"] for r in kept] == [1]
    kept, _ = filter_traces(graded, task, keep="best", min_score=0.5, scorer=by_length)
    assert kept == []
    kept, _ = filter_traces(graded, task, keep="all", min_score=0.2, scorer=by_length)
    assert [r["sample"] for r in kept] == [1, 2]  # sample 3 repeats sample 1


def test_dedupe_drops_responses_that_differ_only_in_whitespace(task, prompts):
    p = prompts[0]
    answer = solve(p["metadata"]["question"])
    responses = [
        f"So.\nAnswer: {answer}",
        f"So.  \n\nAnswer:   {answer}\n",
        f"Hence.\nAnswer: {answer}",
    ]
    records = [sample(p, k, r) for k, r in enumerate(responses)]
    kept, stats = filter_traces(records, task, keep="all")
    assert [r["sample"] for r in kept] == [0, 2]
    assert stats.duplicates == 1 and stats.accepted == 3 and stats.samples == 3
    kept, stats = filter_traces(records, task, keep="all", dedupe=False)
    assert len(kept) == 3 and stats.duplicates == 0


def test_acceptance_rates_and_score_histogram(task, prompts):
    # Prompt 0: 2 of 4 right; prompt 1: 1 of 4; prompts 2 and 3: none.
    plan = {0: [1, 1, 0, 0], 1: [0, 0, 0, 1], 2: [0, 0, 0, 0], 3: [0, 0, 0, 0]}
    records = [
        sample(prompts[i], k, right(prompts[i], f"step {k}") if ok else wrong(prompts[i]))
        for i, oks in plan.items()
        for k, ok in enumerate(oks)
    ]
    _, stats = filter_traces(records, task, keep="all", dedupe=False)
    assert (stats.prompts, stats.samples, stats.accepted, stats.accepted_prompts) == (4, 16, 3, 2)
    assert stats.sample_acceptance == pytest.approx(3 / 16)
    assert stats.prompt_acceptance == pytest.approx(0.5)
    assert stats.histogram["1.0"] == 3 and stats.histogram["[0.0, 0.1)"] == 13
    assert sum(stats.histogram.values()) == 16
    as_json = json.loads(json.dumps(stats.to_dict()))
    assert as_json["sample_acceptance"] == pytest.approx(3 / 16) and as_json["kept"] == 3


@pytest.mark.parametrize(
    ("response", "answer_line"),
    [
        ("3 + 4 = 7.\nAnswer: 7", "Answer: 7"),
        ("First, 3 + 4.\nThat is 7.\n**Answer:** 7\n", "**Answer:** 7"),
        ("3 + 4 = 7, so the answer is 7.", "answer is 7."),
        ("Answer: 6... wait.\nFinal answer: \\boxed{7}", "Final answer: \\boxed{7}"),
    ],
)
def test_answer_start_points_at_the_final_answer(task, prompts, response, answer_line):
    record = {**prompts[0], "response": response}
    kept, _ = filter_traces([record], task, min_score=None, scorer=lambda example, text: 1.0)
    start = kept[0]["answer_start"]
    assert response[start:].rstrip("\n") == answer_line
    assert marked_answer(response[start:]) == "7"


def test_answer_start_is_none_without_a_marker(task, prompts):
    p = prompts[0]
    record = sample(p, 0, f"It is {solve(p['metadata']['question'])}.")
    kept, _ = filter_traces([record], task)
    assert kept[0]["score"] == 1.0 and kept[0]["answer_start"] is None


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_filter_file_writes_the_kept_records_and_their_stats(tmp_path, task, prompts):
    records = [sample(p, k, r) for p in prompts for k, r in enumerate([wrong(p), right(p)])]
    source = write_jsonl(tmp_path / "traces.jsonl", records)
    out = tmp_path / "kept.jsonl"
    stats = filter_file(source, out, task)
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["sample"] for r in kept] == [1] * len(prompts)
    assert json.loads((tmp_path / "kept.stats.json").read_text()) == stats.to_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "kept.jsonl",
        "kept.stats.json",
        "traces.jsonl",
    ]  # no temp file left behind


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"response": None}, r"traces\.jsonl:2: field 'response': must be a string, got null"),
        ({"id": ""}, r"traces\.jsonl:2: field 'id': must be a non-empty string"),
        ({"metadata": {}}, r"traces\.jsonl:2: task 'arithmetic_1digit' cannot score this record"),
    ],
)
def test_a_bad_record_is_a_one_line_input_error(tmp_path, task, prompts, bad, message):
    good = sample(prompts[0], 0, right(prompts[0]))
    source = write_jsonl(tmp_path / "traces.jsonl", [good, {**good, "sample": 1, **bad}])
    with pytest.raises(InputError, match=message) as caught:
        filter_file(source, tmp_path / "kept.jsonl", task)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "kept.jsonl").exists()


class ArithmeticTeacher(Teacher):
    """Answers 'Calculate a op b.' prompts: sample 0 right, the others off by one."""

    name = "arithmetic-stub"

    def iter_generate(
        self, conversations: Sequence[list[dict]], params: SamplingParams
    ) -> Iterator[GenerationResult]:
        for index, messages in enumerate(conversations):
            question = messages[-1]["content"].split("\n")[0]
            value = solve(question)
            texts = [
                f"{question[10:-1]} = {value + k}\nAnswer: {value + k}" for k in range(params.n)
            ]
            yield GenerationResult(index, [Generation(t, "stop", 5, 5, 0.0) for t in texts])


def test_task_prompts_through_generate_and_filter_file(tmp_path, task):
    """The stages as `lmdistill run` chains them: the fields the scorer needs survive generate."""
    from lmdistill.pipelines.generate import generate, read_prompts

    prompts_path = write_jsonl(
        tmp_path / "prompts.jsonl", task_prompts(task, limit=5, template="concise")
    )
    traces = tmp_path / "traces.jsonl"
    generate(
        ArithmeticTeacher(),
        read_prompts(prompts_path),
        traces,
        SamplingParams(temperature=1.0, n=3),
        progress=False,
    )
    stats = filter_file(traces, tmp_path / "kept.jsonl", task, keep="all")
    assert (stats.samples, stats.accepted, stats.kept) == (15, 5, 5)
    kept = [json.loads(line) for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
    assert {r["sample"] for r in kept} == {0}
