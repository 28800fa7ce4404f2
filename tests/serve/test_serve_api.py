"""`lmdistill serve` end to end: the app runs in-process on 127.0.0.1 with uvicorn, and the
official `openai` client talks to it over real HTTP."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import openai
import pytest

from lmdistill.serve import create_app, running_server
from lmdistill.teachers.base import (
    Capability,
    Failure,
    GenerationResult,
    Message,
    SamplingParams,
    Teacher,
)
from lmdistill.teachers.local import HFTeacher

KEY = "test-key-0123456789"
MODEL = "tiny"
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def teacher(tiny_model_dir: Path) -> HFTeacher:
    return HFTeacher(tiny_model_dir, batch_size=16, name=MODEL)


@pytest.fixture(scope="module")
def server(teacher: HFTeacher) -> Iterator[tuple[str, object]]:
    """(base URL, app) of a keyed server. A 50 ms batching window makes requests sent together
    land in one batch even on a busy machine."""
    app = create_app(teacher, api_key=KEY, batch_wait_s=0.05)
    with running_server(app) as base_url:
        yield base_url, app


@pytest.fixture(scope="module")
def client(server: tuple[str, object]) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[0], api_key=KEY, max_retries=0, timeout=60)


def direct(teacher: HFTeacher, messages: list[Message], params: SamplingParams) -> list:
    (result,) = teacher.iter_generate([messages], params)
    return result.generations


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_completion_matches_the_teacher(client: openai.OpenAI, teacher: HFTeacher) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=HELLO, temperature=0, max_tokens=5
    )
    (expected,) = direct(teacher, HELLO, SamplingParams(temperature=0, max_tokens=5))
    (choice,) = response.choices
    assert response.object == "chat.completion" and response.model == MODEL
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason == "length"
    assert response.usage.prompt_tokens == len(teacher.encode_chat(HELLO))
    assert response.usage.completion_tokens == 5
    assert response.usage.total_tokens == response.usage.prompt_tokens + 5


def test_max_completion_tokens_is_honoured(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=HELLO, temperature=0, max_completion_tokens=3
    )
    assert response.usage.completion_tokens == 3


def test_n_choices(client: openai.OpenAI, teacher: HFTeacher) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=HELLO, temperature=1.0, n=3, max_tokens=6, seed=1
    )
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert len({c.message.content for c in response.choices}) > 1  # three samples, not one
    assert response.usage.completion_tokens == 3 * 6
    assert response.usage.prompt_tokens == len(teacher.encode_chat(HELLO))  # once, not 3 times


def test_logprobs_in_openai_format(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        temperature=1.0,
        seed=3,
        max_tokens=8,
        logprobs=True,
        top_logprobs=3,
    )
    choice = response.choices[0]
    content = choice.logprobs.content
    assert len(content) == response.usage.completion_tokens == 8
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.logprob <= tops[0] + 1e-6  # the sampled token is at best the most likely
    # The tokens' bytes put together are the answer (partial UTF-8 characters included).
    joined = b"".join(bytes(entry.bytes) for entry in content)
    assert joined.decode("utf-8", errors="replace") == choice.message.content


def test_logprobs_without_top_logprobs(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=HELLO, temperature=0, max_tokens=4, logprobs=True
    )
    content = response.choices[0].logprobs.content
    assert len(content) == 4
    assert all(entry.top_logprobs == [] and entry.logprob < 0 for entry in content)


def test_no_logprobs_unless_asked(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert response.choices[0].logprobs is None


def test_wrong_or_missing_key_is_rejected(server: tuple[str, object]) -> None:
    wrong = openai.OpenAI(base_url=server[0], api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as error:
        wrong.models.list()
    assert error.value.status_code == 401
    assert error.value.body["code"] == "invalid_api_key"
    response = httpx.post(f"{server[0]}/chat/completions", json={"model": MODEL, "messages": HELLO})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_health_needs_no_key(server: tuple[str, object]) -> None:
    assert httpx.get(server[0].removesuffix("/v1") + "/health").json() == {"status": "ok"}


def test_concurrent_requests_are_batched(
    server: tuple[str, object], client: openai.OpenAI, teacher: HFTeacher
) -> None:
    engine = server[1].state.engine
    prompts = [f"Hello {'world ' * i}" for i in range(8)]
    answers: dict[int, str] = {}
    start = threading.Barrier(len(prompts))

    def ask(i: int) -> None:
        start.wait()
        response = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": prompts[i]}],
            temperature=0,
            max_tokens=4,
        )
        answers[i] = response.choices[0].message.content

    engine.most_rows = 0
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(answers) == len(prompts)
    assert engine.most_rows > 1  # some requests decoded together
    # Batched answers equal one-at-a-time ones.
    for i, prompt in enumerate(prompts):
        messages = [{"role": "user", "content": prompt}]
        (expected,) = direct(teacher, messages, SamplingParams(temperature=0, max_tokens=4))
        assert answers[i] == expected.text


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": []}, "messages"),
        ({"temperature": 3}, "temperature"),
        ({"n": 0}, "n"),
        ({"messages": [{"content": "no role"}]}, "messages.0.role"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"use_beam_search": True}, "use_beam_search"),
        ({"no_such_field": 1}, "no_such_field"),
        ({"top_k": -2}, "top_k"),
        ({"stop_token_ids": [10**6]}, "stop_token_ids"),
        ({"min_tokens": 5}, "min_tokens"),  # more than max_tokens (2)
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs=true, as OpenAI requires
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.0.content",
        ),
    ],
)
def test_bad_requests_get_400_with_openai_error_json(
    server: tuple[str, object], fields: dict, param: str
) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 2, **fields}
    response = httpx.post(
        f"{server[0]}/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


def test_bad_request_through_the_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    assert error.value.status_code == 400


def test_malformed_json_is_a_400(server: tuple[str, object]) -> None:
    response = httpx.post(
        f"{server[0]}/chat/completions",
        content=b"{not json",
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "the request body is not valid JSON"


def test_unknown_model_is_a_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-5", messages=HELLO, max_tokens=2)
    assert error.value.body["code"] == "model_not_found"


def test_content_parts_are_joined(client: openai.OpenAI, teacher: HFTeacher) -> None:
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": parts}], temperature=0, max_tokens=3
    )
    assert response.usage.prompt_tokens == len(teacher.encode_chat(HELLO))


class BrokenTeacher(Teacher):
    """Fails the first batch with an exception, then answers every request with a Failure."""

    name = "broken"
    capabilities = Capability.TEXT

    def __init__(self) -> None:
        self.calls = 0

    def iter_generate(
        self, conversations: Sequence[list[Message]], params: SamplingParams
    ) -> Iterator[GenerationResult]:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("CUDA error: device-side assert")
        for i in range(len(conversations)):
            yield GenerationResult(i, failure=Failure("server_error", "upstream exploded"))


def test_teacher_errors_are_500s_and_the_server_keeps_going() -> None:
    with running_server(create_app(BrokenTeacher())) as base_url:
        body = {"model": "broken", "messages": HELLO}
        first = httpx.post(f"{base_url}/chat/completions", json=body)
        second = httpx.post(f"{base_url}/chat/completions", json=body)
    assert first.status_code == 500
    assert first.json()["error"]["type"] == "server_error"
    assert "CUDA" not in first.json()["error"]["message"]  # internals stay in the server log
    assert second.status_code == 500
    assert second.json()["error"]["message"] == "upstream exploded"


def test_api_key_never_reaches_the_logs(teacher: HFTeacher) -> None:
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Collect()
    loggers = [logging.getLogger(n) for n in ("uvicorn", "uvicorn.access", "uvicorn.error")]
    app = create_app(teacher, api_key=KEY)
    with running_server(app, log_level="debug") as base_url:
        for logger in loggers:
            logger.addHandler(handler)
        try:
            for key in (KEY, "wrong-key-abc"):
                headers = {"Authorization": f"Bearer {key}"}
                httpx.get(f"{base_url}/models", headers=headers)
                body = {"model": MODEL, "messages": HELLO, "max_tokens": 1}
                httpx.post(f"{base_url}/chat/completions", json=body, headers=headers)
        finally:
            for logger in loggers:
                logger.removeHandler(handler)
    text = "\n".join(records)
    assert "/v1/chat/completions" in text  # the access log did record the requests
    assert KEY not in text and "wrong-key-abc" not in text
