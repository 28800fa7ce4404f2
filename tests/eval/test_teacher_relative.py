"""Teacher-relative metrics: KL against F.kl_div, a model against itself (KL 0, agreement 1),
perplexity against a plain cross-entropy, and the whole task on a JSONL of prompts."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lmdistill.eval import teacher_relative
from lmdistill.eval.base import EvalSettings, ScoreMemo, TeacherContext
from lmdistill.eval.teacher_relative import (
    TeacherRelativeEval,
    kl_per_position,
    read_prompt_file,
    token_stats,
)
from lmdistill.teachers.local import HFTeacher

PROMPTS = [[{"role": "user", "content": p}] for p in ("Hello", "What is 2 + 3?", "Hi")]
RESPONSES = ["The answer is 5.", "Paris", "Hello world! How are you today?"]


@pytest.fixture(scope="module")
def teacher(tiny_model_dir) -> HFTeacher:
    return HFTeacher(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def student(tiny_student_dir) -> HFTeacher:
    return HFTeacher(tiny_student_dir, device="cpu")


def test_kl_per_position_matches_f_kl_div():
    generator = torch.Generator().manual_seed(0)
    teacher_lp = torch.log_softmax(torch.randn(6, 50, generator=generator) * 3, -1)
    student_lp = torch.log_softmax(torch.randn(6, 50, generator=generator) * 3, -1)
    # F.kl_div(input=log q, target=log p, log_target=True) is sum p (log p - log q) = KL(p || q).
    expected = F.kl_div(student_lp, teacher_lp, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(
        kl_per_position(teacher_lp, student_lp), expected, atol=1e-5, rtol=1e-5
    )
    assert kl_per_position(teacher_lp, teacher_lp).abs().max() == 0


def test_a_model_against_itself(tiny_model_dir, teacher):
    twin = HFTeacher(tiny_model_dir, device="cpu")  # a second copy: a real second forward pass
    stats, shared = token_stats(teacher, twin, PROMPTS, RESPONSES, [True, False, True])
    assert shared
    for stat in stats:
        assert stat.tokens > 0
        assert stat.kl == pytest.approx(0.0, abs=1e-6)
        assert stat.agree == stat.tokens


def reference_stats(teacher, student, prompt, response, ended):
    """KL sum and NLL sum, from one plain forward pass of each model, in float64."""
    response_ids = teacher.tokenizer(response, add_special_tokens=False)["input_ids"]
    response_ids += [teacher.eos_ids[0]] if ended else []
    context = teacher.encode_chat(prompt)
    ids = torch.tensor([context + response_ids])
    with torch.no_grad():
        t_logits = teacher.model(input_ids=ids).logits[0, len(context) - 1 : -1].double()
        s_logits = student.model(input_ids=ids).logits[0, len(context) - 1 : -1].double()
    kl = F.kl_div(
        F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True, reduction="sum"
    )
    nll = F.cross_entropy(s_logits, torch.tensor(response_ids), reduction="sum")
    agree = (t_logits.argmax(-1) == s_logits.argmax(-1)).sum()
    return float(kl), float(nll), int(agree), len(response_ids)


def test_two_models_match_plain_formulas(teacher, student):
    ended = [True, False, True]
    stats, shared = token_stats(teacher, student, PROMPTS, RESPONSES, ended, token_budget=64)
    assert shared
    for stat, prompt, response, end in zip(stats, PROMPTS, RESPONSES, ended, strict=True):
        kl, nll, agree, tokens = reference_stats(teacher, student, prompt, response, end)
        assert stat.tokens == tokens
        assert stat.kl == pytest.approx(kl, rel=1e-4) and kl > 0
        assert stat.nll == pytest.approx(nll, rel=1e-4)
        assert stat.agree == agree


def test_the_teachers_scores_are_kept_for_the_next_student(teacher, student, monkeypatch):
    ended = [True, False, True]
    plain, _ = token_stats(teacher, student, PROMPTS, RESPONSES, ended, token_budget=64)
    memo = ScoreMemo()
    first, _ = token_stats(teacher, student, PROMPTS, RESPONSES, ended, token_budget=64, memo=memo)
    assert memo.used_bytes > 0 and memo.hits == 0
    # The second student: the teacher is never run again, and every figure is the same.
    forwards = []
    real_logits = teacher.logits
    monkeypatch.setattr(teacher, "logits", lambda *a: forwards.append(1) or real_logits(*a))
    second, _ = token_stats(teacher, student, PROMPTS, RESPONSES, ended, token_budget=64, memo=memo)
    assert forwards == [] and memo.hits > 0
    assert first == second == plain
    # A memo with no room stores nothing: the teacher runs for every student.
    full = ScoreMemo(budget_bytes=0)
    token_stats(teacher, student, PROMPTS, RESPONSES, ended, token_budget=64, memo=full)
    token_stats(teacher, student, PROMPTS, RESPONSES, ended, token_budget=64, memo=full)
    assert full.used_bytes == 0 and full.hits == 0 and len(forwards) > 0


def test_task_on_a_jsonl_with_references(tmp_path, teacher, student):
    path = tmp_path / "held_out.jsonl"
    rows = [
        {"id": "a", "prompt": "Hello", "response": "Hello world"},
        {"id": "b", "prompt": "What is 2 + 3?"},
        {"id": "c", "prompt": "Hi", "split": "test"},
        {"id": "d", "prompt": "Train on me", "split": "train"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p.id for p in read_prompt_file(path)] == ["c"]  # a split field: test lines only
    rows = rows[:2]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = TeacherRelativeEval("rel-jsonl:held_out", path=path)
    settings = EvalSettings(max_tokens=6)

    own = task.run(teacher, settings)
    assert own.metrics["kl"].value == 0.0
    assert own.metrics["top1_agreement"].value == 1.0
    by_id = {r["id"]: r for r in own.records}
    assert by_id["a"]["reference"] == "Hello world"  # the file's reference
    assert by_id["b"]["reference"] == by_id["b"]["response"]  # else the teacher's own response
    assert by_id["b"]["rouge_l"] == 1.0

    context = TeacherContext(lambda: teacher, own, "fingerprint")
    result = task.run(student, settings, teacher=context)
    stats, _ = token_stats(
        teacher,
        student,
        [[{"role": "user", "content": r["prompt"]}] for r in rows],
        [by_id[r["id"]]["response"] for r in rows],
        [by_id[r["id"]]["ended"] for r in rows],
    )
    tokens = sum(s.tokens for s in stats)
    assert result.metrics["kl"].value == pytest.approx(sum(s.kl for s in stats) / tokens)
    assert result.metrics["perplexity"].value == pytest.approx(
        math.exp(sum(s.nll for s in stats) / tokens)
    )
    assert result.metrics["kl"].low <= result.metrics["kl"].value <= result.metrics["kl"].high
    assert result.per_example == [r["rouge_l"] for r in result.records]


def test_the_teachers_own_greedy_file_is_not_generated_again(
    tmp_path, tiny_model_dir, teacher, monkeypatch
):
    """A held-out file written by `generate` with this teacher, greedily, at the eval's
    max_tokens (the quickstart's) gives the same result without generating; any other file, or
    other settings, generate. The teacher needs a name that identifies its weights (here the
    tiny model stands in for the bundled teacher); a model dir's name does not."""
    from lmdistill.pipelines.generate import generate, read_prompts
    from lmdistill.teachers.base import SamplingParams
    from lmdistill.teachers.bundled import BUNDLED_NAMES

    by_dir_name = teacher
    teacher = HFTeacher(tiny_model_dir, device="cpu", name=BUNDLED_NAMES[0])

    prompts_path = tmp_path / "p.jsonl"
    prompts_path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Hi", "2 + 3?")))
    made = tmp_path / "made.jsonl"
    generate(teacher, read_prompts(prompts_path), made, SamplingParams(max_tokens=6), cache=None)
    by_dir = tmp_path / "by_dir.jsonl"
    generate(by_dir_name, read_prompts(prompts_path), by_dir, SamplingParams(max_tokens=6))
    task = TeacherRelativeEval("rel-jsonl:made", path=made)
    settings = EvalSettings(max_tokens=6)
    fresh = task.run(teacher, settings)  # with generation (below: none allowed)

    def no_generation(*args, **kwargs):
        raise AssertionError("generated again")

    monkeypatch.setattr(teacher_relative, "generate_responses", no_generation)
    reused = task.run(teacher, settings)
    assert reused.details["responses"].startswith("the file's")
    assert reused.records == fresh.records
    assert reused.metrics == fresh.metrics
    assert reused.completion_tokens == fresh.completion_tokens
    with pytest.raises(AssertionError, match="generated again"):
        task.run(teacher, EvalSettings(max_tokens=5))  # other settings: not the file's
    with pytest.raises(AssertionError, match="generated again"):  # a dir name: other weights?
        TeacherRelativeEval("rel-jsonl:by_dir", path=by_dir).run(by_dir_name, settings)
    edited = [json.loads(line) for line in made.read_text().splitlines()]
    edited[0]["teacher"] = "another-model"
    made.write_text("".join(json.dumps(r) + "\n" for r in edited))
    with pytest.raises(AssertionError, match="generated again"):
        TeacherRelativeEval("rel-jsonl:made", path=made).run(teacher, settings)


def test_against_the_files_responses_no_teacher_is_needed(tmp_path, student):
    """ref-jsonl: a text-only teacher's answers are the references. The student gets ROUGE-L
    against them and the perplexity of their tokens (no KL or agreement: there is no teacher
    distribution); a text-only model gets ROUGE-L alone; a line without a response is refused."""
    from eval_fakes import ScriptedTeacher

    from lmdistill.errors import UserError
    from lmdistill.eval.rouge import rouge_l

    path = tmp_path / "held_out.jsonl"
    rows = [
        {"id": "a", "prompt": "Hello", "response": "Hello world"},
        {"id": "b", "prompt": "What is 2 + 3?", "response": "The answer is 5."},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = TeacherRelativeEval("ref-jsonl:held_out", path=path, references=True)
    assert not task.needs_teacher
    settings = EvalSettings(max_tokens=6)

    result = task.run(student, settings)
    assert set(result.metrics) == {"rouge_l", "perplexity"}
    references = [r["response"] for r in rows]
    plain = [  # (kl, nll, agree, tokens) from one plain forward pass per reference
        reference_stats(student, student, [{"role": "user", "content": r["prompt"]}], ref, True)
        for r, ref in zip(rows, references, strict=True)
    ]
    nll, tokens = sum(p[1] for p in plain), sum(p[3] for p in plain)
    assert result.metrics["perplexity"].value == pytest.approx(math.exp(nll / tokens), rel=1e-4)
    for record, reference in zip(result.records, references, strict=True):
        assert record["reference"] == reference
        assert record["rouge_l"] == rouge_l(record["response"], reference).f
        assert record["kl"] is None

    api = ScriptedTeacher(lambda messages, _: "Hello world")  # text only, like an API
    answered = task.run(api, settings)
    assert set(answered.metrics) == {"rouge_l"}
    assert answered.per_example == [1.0, rouge_l("Hello world", "The answer is 5.").f]

    path.write_text(json.dumps({"id": "c", "prompt": "Hi"}) + "\n")
    with pytest.raises(UserError, match=r"\['c'\] have no 'response'"):
        TeacherRelativeEval("ref-jsonl:held_out", path=path, references=True)
