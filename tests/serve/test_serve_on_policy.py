"""On-policy distillation through served models (issues #12, #18): the student's server samples
with token ids, the teacher's server scores that sample with prompt log-probs, and the served
scores equal the in-process teacher's, token by token."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from lmdistill.serve import create_app, running_server
from lmdistill.teachers.local import HFTeacher

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
TOP_K = 5


def sample_with_token_ids(base_url: str, model: str, prompt_ids: list[int]) -> list[int]:
    """The student's side: a sampled continuation, as token ids (no re-tokenizing of text)."""
    body = {
        "model": model,
        "prompt": prompt_ids,
        "max_tokens": 16,
        "temperature": 1.0,
        "seed": 5,
        "return_token_ids": True,
    }
    response = httpx.post(f"{base_url}/completions", json=body, timeout=120)
    response.raise_for_status()
    return response.json()["choices"][0]["token_ids"]


def served_scores(base_url: str, model: str, ids: list[int]) -> list[dict | None]:
    """The teacher's side: prompt log-probs of the whole sequence, nothing generated."""
    body = {"model": model, "prompt": ids, "max_tokens": 0, "prompt_logprobs": TOP_K}
    response = httpx.post(f"{base_url}/completions", json=body, timeout=120)
    response.raise_for_status()
    return response.json()["choices"][0]["prompt_logprobs"]


def check_against_in_process(teacher: HFTeacher, ids: list[int], start: int, scores: list) -> None:
    """Every sampled token's served log-prob and top-k equal the in-process teacher's."""
    logits = teacher.logits(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    assert len(scores) == len(ids) and scores[0] is None
    for t in range(start, len(ids)):
        entries = scores[t]
        expected = float(logprobs[t - 1, ids[t]])
        assert entries[str(ids[t])]["logprob"] == pytest.approx(expected, abs=2e-4), t
        top = logprobs[t - 1].topk(TOP_K)
        ranked = sorted(
            (e["rank"], int(token)) for token, e in entries.items() if e["rank"] <= TOP_K
        )
        assert [token for _, token in ranked] == top.indices.tolist()


def test_served_teacher_scores_a_served_students_sample(tmp_path: Path) -> None:
    from tiny import save_tiny_model_dir

    student = HFTeacher(save_tiny_model_dir(tmp_path / "student", seed=1), name="student")
    teacher = HFTeacher(save_tiny_model_dir(tmp_path / "teacher", seed=2), name="teacher")
    prompt = teacher.encode_chat(MESSAGES)
    with (
        running_server(create_app(student)) as student_url,
        running_server(create_app(teacher)) as teacher_url,
    ):
        sample = sample_with_token_ids(student_url, "student", prompt)
        ids = prompt + sample
        scores = served_scores(teacher_url, "teacher", ids)
    assert len(sample) > 0
    check_against_in_process(teacher, ids, len(prompt), scores)


REAL_CACHE = Path(
    os.environ.get("LMDISTILL_CACHE_DIR") or Path(__file__).parents[2] / ".cache" / "lmdistill-test"
)


@pytest.fixture(scope="module")
def real_teacher() -> Iterator[HFTeacher]:
    from lmdistill.teachers import bundled
    from lmdistill.teachers.registry import load_teacher

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(bundled.CACHE_ENV, str(REAL_CACHE))
        yield load_teacher("smollm2-135m-instruct")


@pytest.mark.integration
def test_bundled_teacher_served_scores_equal_in_process(real_teacher: HFTeacher) -> None:
    prompt = real_teacher.encode_chat(MESSAGES)
    with running_server(create_app(real_teacher)) as url:
        sample = sample_with_token_ids(url, real_teacher.name, prompt)
        scores = served_scores(url, real_teacher.name, prompt + sample)
    check_against_in_process(real_teacher, prompt + sample, len(prompt), scores)
