"""lm-evaluation-harness itself against `lmdistill serve` (issue #18): its `lm_eval` command with
`local-completions` on a multiple-choice task (loglikelihood through echo + logprobs, tokenized by
the server's /tokenize) and `local-chat-completions` on a generate-until task with `until`. The
tasks' data are JSON files written here; nothing is downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from lmdistill.serve import create_app, running_server
from lmdistill.teachers.local import HFTeacher

pytestmark = pytest.mark.slow

MODEL = "tiny"
KEY = "lm-eval-key"
QUESTIONS = [
    {"question": "The capital of France is", "choices": ["Paris", "Tokyo", "42"], "answer": 0},
    {"question": "What is 7 * 6? The answer is", "choices": ["5", "42"], "answer": 1},
]


@pytest.fixture(scope="module")
def teacher(tiny_model_dir: Path) -> HFTeacher:
    return HFTeacher(tiny_model_dir, name=MODEL)


@pytest.fixture(scope="module")
def base_url(teacher: HFTeacher) -> Iterator[str]:
    with running_server(create_app(teacher, api_key=KEY)) as url:
        yield url


def write_task(directory: Path, name: str, data: list[dict], spec: dict) -> None:
    data_file = directory / f"{name}.json"
    data_file.write_text(json.dumps(data))
    task = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "doc_to_text": "{{question}}",
        **spec,
    }
    # JSON is YAML: no YAML writer needed.
    (directory / f"{name}.yaml").write_text(json.dumps(task))


def run_lm_eval(model: str, model_args: str, task: str, directory: Path, *extra: str) -> list[dict]:
    """Run the `lm_eval` command and return its logged samples."""
    out = directory / "out"
    env = {**os.environ, "OPENAI_API_KEY": KEY, "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args]
    command += ["--tasks", task, "--include_path", str(directory), "--output_path", str(out)]
    done = subprocess.run(
        [*command, "--log_samples", *extra], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (samples,) = out.rglob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in samples.read_text().splitlines()]


def test_local_completions_multiple_choice_loglikelihood(
    base_url: str, teacher: HFTeacher, tmp_path: Path
) -> None:
    spec = {
        "output_type": "multiple_choice",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc"}],
    }
    write_task(tmp_path, "tiny_mc", QUESTIONS, spec)
    args = f"model={MODEL},base_url={base_url}/completions,num_concurrent=2,max_retries=1"
    samples = run_lm_eval("local-completions", args, "tiny_mc", tmp_path)
    assert len(samples) == len(QUESTIONS)
    tokenize = teacher.tokenizer
    for sample in samples:
        # Logged arguments: {"gen_args_0": {"arg_0": context, "arg_1": continuation}, ...};
        # responses: [[["logprob", "is_greedy"]], ...], as strings.
        arguments = [(a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()]
        for (context, continuation), (response,) in zip(arguments, sample["resps"], strict=True):
            logprob, is_greedy = response
            # The same sum from the in-process model: context then continuation tokens.
            ctx = tokenize(context, add_special_tokens=False)["input_ids"]
            cont = tokenize(continuation, add_special_tokens=False)["input_ids"]
            ids = ctx + cont
            logits = teacher.logits(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
            logprobs = torch.log_softmax(logits[0].double(), dim=-1)
            positions = range(len(ctx) - 1, len(ids) - 1)
            expected = sum(float(logprobs[t, ids[t + 1]]) for t in positions)
            assert float(logprob) == pytest.approx(expected, abs=1e-3)
            greedy = all(int(logprobs[t].argmax()) == ids[t + 1] for t in positions)
            assert is_greedy == str(greedy)


def test_local_chat_completions_generate_until(
    base_url: str, teacher: HFTeacher, tmp_path: Path
) -> None:
    question = "What is 2 + 3?"
    # What the model writes for this question at lm-eval's seed (1234), without any stop.
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 12,
        "temperature": 1.0,
        "seed": 1234,
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    full = httpx.post(f"{base_url}/chat/completions", json=body, headers=headers, timeout=60)
    text = full.json()["choices"][0]["message"]["content"]
    until = text[len(text) // 2]  # a character the free text does contain
    spec = {
        "output_type": "generate_until",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": [until], "max_gen_toks": 12, "temperature": 1.0},
        "metric_list": [{"metric": "exact_match"}],
    }
    write_task(tmp_path, "tiny_gen", [{"question": question, "answer": "5"}], spec)
    args = f"model={MODEL},base_url={base_url}/chat/completions,num_concurrent=1,max_retries=1"
    (sample,) = run_lm_eval(
        "local-chat-completions", args, "tiny_gen", tmp_path, "--apply_chat_template"
    )
    # The server stopped at `until` (lm-eval does not cut chat answers itself).
    assert sample["resps"] == [[text[: text.index(until)]]]
