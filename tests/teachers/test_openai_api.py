"""OpenAITeacher against real HTTP servers on 127.0.0.1 (tests/faultserver.py), through the real
`openai` client. Retry delays are a few milliseconds so the whole file runs in seconds."""

from __future__ import annotations

import random
import socket
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from faultserver import FaultPlan, FaultServer

from lmdistill.errors import UserError
from lmdistill.teachers.base import Capability, SamplingParams
from lmdistill.teachers.openai_api import (
    OpenAITeacher,
    RetryPolicy,
    TeacherAuthError,
    parse_retry_after,
    public_url,
)

SECRET = "sk-test-0123456789-do-not-print"


def conversations(count: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"question {i}"}] for i in range(count)]


def make_teacher(server: FaultServer, **overrides: object) -> OpenAITeacher:
    options: dict = {
        "base_url": server.base_url,
        "timeout_s": 0.5,
        "retry_base_delay_s": 0.005,
        "max_retries": 8,
        "concurrency": 8,
        "jitter_seed": 0,
    }
    options.update(overrides)
    return OpenAITeacher("fault", **options)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------ retry policy


def test_retry_after_seconds_milliseconds_and_http_date() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after({"retry-after": "7"}) == 7.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    in_30s = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after({"retry-after": in_30s}, now=now) == pytest.approx(30.0)
    past = format_datetime(now - timedelta(seconds=30), usegmt=True)
    assert parse_retry_after({"retry-after": past}, now=now) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


def test_full_jitter_stays_within_the_exponential_bound() -> None:
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=4.0)
    rng = random.Random(0)
    for retry in range(8):
        bound = min(4.0, 0.5 * 2**retry)
        delays = [policy.delay(retry, None, rng) for _ in range(200)]
        assert all(0.0 <= d <= bound for d in delays)
        assert max(delays) > 0.8 * bound  # jitter spreads over the whole range, not a fixed wait


def test_retry_after_overrides_backoff_but_is_capped() -> None:
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=10.0)
    rng = random.Random(0)
    assert policy.delay(0, 3.0, rng) == 3.0
    assert policy.delay(5, 3600.0, rng) == 10.0


def test_public_url_hides_credentials() -> None:
    assert public_url("https://user:pw@host:8443/v1") == "https://host:8443/v1"
    assert public_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"


# ------------------------------------------------------------------------- against a server


def test_every_prompt_completes_despite_30_percent_faults() -> None:
    plan = FaultPlan(fault_rate=0.3, stall_s=3.0, seed=1)
    with FaultServer(plan) as server:
        teacher = make_teacher(server, timeout_s=0.3)
        results = list(teacher.iter_generate(conversations(40), SamplingParams(n=2)))
        outcomes = server.outcomes()
    assert sorted(r.index for r in results) == list(range(40))
    assert all(r.failure is None and len(r.generations) == 2 for r in results)
    for r in results:
        assert [g.text for g in r.generations] == [
            f"answer 0 to: question {r.index}",
            f"answer 1 to: question {r.index}",
        ]
    # The run really met every kind of fault, and retried past each.
    assert {"429", "500", "stall", "badjson", "drop"} <= set(outcomes)


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("500", "server_error"),
        ("429", "rate_limited"),
        ("stall", "timeout"),
        ("badjson", "bad_response"),
        ("drop", "connection"),
    ],
)
def test_a_server_that_always_fails_gives_a_failure_per_prompt(fault: str, reason: str) -> None:
    with FaultServer(FaultPlan(always=fault, stall_s=1.0)) as server:
        teacher = make_teacher(server, max_retries=2, timeout_s=0.2)
        results = list(teacher.iter_generate(conversations(3), SamplingParams()))
        requests = server.request_count
    assert sorted(r.index for r in results) == [0, 1, 2]
    for r in results:
        assert r.generations == []
        assert r.failure is not None
        assert (r.failure.reason, r.failure.attempts) == (reason, 3)
    assert requests == 3 * 3  # bounded: 1 try + 2 retries per prompt, then it stops


def test_unreachable_server_fails_with_reason_connection() -> None:
    teacher = OpenAITeacher(
        "m", base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=2, retry_base_delay_s=0.001
    )
    results = list(teacher.iter_generate(conversations(2), SamplingParams()))
    assert [(r.failure.reason, r.failure.attempts) for r in results if r.failure] == [
        ("connection", 3),
        ("connection", 3),
    ]


def test_retry_after_is_honoured() -> None:
    plan = FaultPlan(fault_rate=1.0, faults=("429",), retry_after="1")
    with FaultServer(plan) as server:
        teacher = make_teacher(server, max_retries=1)
        [result] = teacher.iter_generate(conversations(1), SamplingParams())
        first, second = (entry.time for entry in server.log)
    assert result.failure is not None and result.failure.reason == "rate_limited"
    # Backoff alone would wait at most 5 ms here; the server asked for 1 s.
    assert second - first >= 0.95


def test_wrong_api_key_stops_at_once_without_showing_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with FaultServer(FaultPlan(api_key="the-right-key")) as server:
        teacher = make_teacher(server, concurrency=2)
        with pytest.raises(TeacherAuthError) as caught:
            list(teacher.iter_generate(conversations(50), SamplingParams()))
        requests = server.request_count
        echoed = server.log[0].authorization
    assert SECRET in echoed  # the key was sent (and the server echoed it in its error body)...
    assert SECRET not in str(caught.value)  # ...but the message does not carry it
    assert "rejected the API key" in str(caught.value)
    assert requests <= 2  # no retries, no further prompts: one 401 per worker at most
    assert SECRET not in repr(teacher) and SECRET not in teacher.name


def test_key_is_read_from_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_TEACHER_KEY", SECRET)
    with FaultServer(FaultPlan(api_key=SECRET)) as server:
        teacher = make_teacher(server, api_key_env="MY_TEACHER_KEY")
        [result] = teacher.iter_generate(conversations(1), SamplingParams())
    assert result.failure is None


def test_openai_endpoint_without_key_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(UserError, match=r"set \$OPENAI_API_KEY"):
        OpenAITeacher("gpt-4o-mini")


def test_concurrency_limits_requests_in_flight() -> None:
    with FaultServer(FaultPlan(latency_s=0.05)) as server:
        teacher = make_teacher(server, concurrency=3)
        results = list(teacher.iter_generate(conversations(12), SamplingParams()))
        most = server.max_in_flight
    assert len(results) == 12
    assert most == 3


def test_server_ignoring_n_gets_separate_requests_with_distinct_seeds() -> None:
    with FaultServer(FaultPlan(max_choices=1)) as server:
        teacher = make_teacher(server, concurrency=1)
        results = list(teacher.iter_generate(conversations(3), SamplingParams(n=3, seed=10)))
        bodies = [entry.body for entry in server.log]
    assert all(len(r.generations) == 3 and r.failure is None for r in results)
    # First prompt: n=3 (1 choice back), then two single requests with seeds 11 and 12. Later
    # prompts: the teacher learned, so three single requests each.
    assert [(b["n"], b.get("seed")) for b in bodies[:3]] == [(3, 10), (1, 11), (1, 12)]
    assert all(b["n"] == 1 for b in bodies[3:]) and len(bodies) == 9


def test_partial_samples_are_kept_with_the_failure() -> None:
    # A server that ignores n answers the first request, then fails the extra single requests.
    with FaultServer(FaultPlan(max_choices=1, always="500", ok_first=1)) as server:
        teacher = make_teacher(server, concurrency=1, max_retries=0)
        [result] = teacher.iter_generate(conversations(1), SamplingParams(n=3))
    assert len(result.generations) == 1  # paid for, so handed back rather than dropped
    assert result.failure is not None and result.failure.reason == "server_error"


def test_top_logprobs_when_declared() -> None:
    with FaultServer() as server:
        teacher = make_teacher(server, logprobs=True)
        assert teacher.can(Capability.TOPK_LOGPROBS)
        [result] = teacher.iter_generate(conversations(1), SamplingParams(top_logprobs=2))
    [generation] = result.generations
    assert generation.top_logprobs is not None and generation.token_logprobs is not None
    assert len(generation.top_logprobs) == generation.completion_tokens == 5
    assert all(len(position) == 2 for position in generation.top_logprobs)
    assert generation.token_logprobs[0] == ("answer", -0.1)


def test_top_logprobs_without_the_capability_is_refused() -> None:
    with FaultServer() as server:
        teacher = make_teacher(server)
        with pytest.raises(UserError, match="cannot give topk_logprobs"):
            list(teacher.iter_generate(conversations(1), SamplingParams(top_logprobs=2)))


def test_closing_the_iterator_cancels_requests_in_flight() -> None:
    with FaultServer(FaultPlan(latency_s=0.02)) as server:
        teacher = make_teacher(server, concurrency=2)
        results = teacher.iter_generate(conversations(500), SamplingParams())
        first = next(results)
        start = time.monotonic()
        results.close()
        closed_in = time.monotonic() - start
        time.sleep(0.1)
        sent = server.request_count
    assert first.failure is None
    assert closed_in < 1.0
    assert sent < 50  # the other 450+ prompts were never sent


def test_against_lmdistill_serve_with_key_n_and_logprobs(
    tiny_model_dir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interop with the project's own server (a tiny local model behind `create_app`)."""
    from lmdistill.serve.app import create_app
    from lmdistill.serve.server import running_server
    from lmdistill.teachers.local import HFTeacher

    app = create_app(HFTeacher(tiny_model_dir, batch_size=4), api_key=SECRET, model_name="tiny")
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with running_server(app) as url:
        teacher = OpenAITeacher("tiny", base_url=url, logprobs=True, concurrency=4)
        params = SamplingParams(temperature=0.8, n=2, max_tokens=5, top_logprobs=3)
        results = list(teacher.iter_generate(conversations(3), params))
        monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
        with pytest.raises(TeacherAuthError):
            wrong_key = OpenAITeacher("tiny", base_url=url)
            list(wrong_key.iter_generate(conversations(1), SamplingParams()))
    assert sorted(r.index for r in results) == [0, 1, 2]
    for result in results:
        assert result.failure is None and len(result.generations) == 2
        for generation in result.generations:
            assert 0 < generation.completion_tokens <= 5
            assert generation.top_logprobs is not None
            assert all(len(position) == 3 for position in generation.top_logprobs)
