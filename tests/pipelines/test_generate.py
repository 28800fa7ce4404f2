"""`lmdistill.pipelines.generate` as a library: records, resume, cache, failures, bad input.
The teacher is the real OpenAITeacher against tests/faultserver.py on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultserver import FaultPlan, FaultServer

from lmdistill.data.jsonl import JsonlAppender
from lmdistill.errors import InputError, UserError
from lmdistill.pipelines.generate import generate, read_prompts
from lmdistill.pipelines.response_cache import ResponseCache
from lmdistill.teachers.base import Prices, SamplingParams
from lmdistill.teachers.openai_api import OpenAITeacher

PARAMS = SamplingParams(temperature=0.7, n=2, max_tokens=32)


def write_prompts(path: Path, count: int, start: int = 0) -> Path:
    lines = [json.dumps({"prompt": f"question {i}", "topic": f"t{i}"}) for i in range(start, count)]
    path.write_text("\n".join(lines) + "\n")
    return path


def read_out(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def pairs(records: list[dict]) -> list[tuple[str, int]]:
    return sorted((r["id"], r["sample"]) for r in records)


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as running:
        yield running


def teacher_for(server: FaultServer, **options: object) -> OpenAITeacher:
    defaults: dict = {"timeout_s": 0.5, "retry_base_delay_s": 0.002, "max_retries": 8}
    return OpenAITeacher("fault", base_url=server.base_url, **{**defaults, **options})


def test_records_carry_fields_system_prompt_and_usage(tmp_path: Path, server: FaultServer) -> None:
    prompts_path = tmp_path / "p.jsonl"
    prompts_path.write_text(
        json.dumps({"id": 7, "prompt": "hi", "topic": "greeting"})
        + "\n\n"  # a blank line is skipped
        + json.dumps({"messages": [{"role": "user", "content": "yo"}]})
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    summary = generate(
        teacher_for(server),
        read_prompts(prompts_path),
        out,
        PARAMS,
        system="Be brief.",
        prices=Prices(input_per_m=1.0, output_per_m=2.0),
    )
    records = read_out(out)
    assert len(records) == 4 and summary.generated == 4 and summary.complete
    first = next(r for r in records if r["id"] == "7" and r["sample"] == 1)
    assert first["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    assert first["response"] == "answer 1 to: hi"
    assert first["finish_reason"] == "stop"
    assert first["topic"] == "greeting"
    assert first["teacher"] == f"openai:fault@{server.base_url}"
    assert first["sampling"] == {
        "temperature": 0.7,
        "top_p": 1.0,
        "max_tokens": 32,
        "n": 2,
        "seed": None,
    }
    assert first["usage"]["completion_tokens"] > 0 and first["latency_s"] >= 0
    other = [r for r in records if r["id"] != "7"]
    assert len(other) == 2 and other[0]["id"].startswith("h")  # content hash id
    # Billed as the server counts (words here): the prompt once per request (system + user = 3
    # words, 2 requests), completions per sample ("answer 1 to: hi" = 4 words, 4 samples).
    assert (summary.prompt_tokens, summary.completion_tokens) == (6, 16)
    assert summary.cost_usd == pytest.approx((6 * 1.0 + 16 * 2.0) / 1e6)


def test_rerun_sends_only_what_is_missing(tmp_path: Path, server: FaultServer) -> None:
    out = tmp_path / "out.jsonl"
    generate(teacher_for(server), read_prompts(write_prompts(tmp_path / "a.jsonl", 5)), out, PARAMS)
    assert server.request_count == 5
    # Drop one record (as if lost): only that sample is requested again, with n=1.
    lines = out.read_text().splitlines(keepends=True)
    gone = json.loads(lines[3])
    out.write_text("".join(lines[:3] + lines[4:]))
    summary = generate(teacher_for(server), read_prompts(tmp_path / "a.jsonl"), out, PARAMS)
    assert summary.already_done == 9 and summary.generated == 1
    assert server.request_count == 6 and server.log[-1].body["n"] == 1
    assert server.log[-1].prompt == gone["messages"][-1]["content"]
    assert len(pairs(read_out(out))) == len(set(pairs(read_out(out)))) == 10


def test_a_torn_last_line_is_cut_and_redone(tmp_path: Path, server: FaultServer) -> None:
    prompts = read_prompts(write_prompts(tmp_path / "p.jsonl", 3))
    out = tmp_path / "out.jsonl"
    generate(teacher_for(server), prompts, out, PARAMS)
    text = out.read_text()
    last_start = text.rstrip("\n").rfind("\n") + 1
    out.write_text(text[: last_start + 25])  # a crash mid-write of the last record
    summary = generate(teacher_for(server), prompts, out, PARAMS)
    assert summary.generated == 1
    records = read_out(out)  # every line parses
    assert pairs(records) == sorted({(r["id"], r["sample"]) for r in records}) and len(records) == 6


def test_a_corrupt_line_mid_file_is_named_not_dropped(tmp_path: Path, server: FaultServer) -> None:
    prompts = read_prompts(write_prompts(tmp_path / "p.jsonl", 3))
    out = tmp_path / "out.jsonl"
    generate(teacher_for(server), prompts, out, PARAMS)
    lines = out.read_text().splitlines(keepends=True)
    lines[2] = "{not json\n"
    out.write_text("".join(lines))
    before = out.read_bytes()
    with pytest.raises(InputError, match=r"out\.jsonl:3: not valid JSON"):
        generate(teacher_for(server), prompts, out, PARAMS)
    assert out.read_bytes() == before


def test_cache_prevents_paying_twice_across_runs_and_files(
    tmp_path: Path, server: FaultServer
) -> None:
    prompts = read_prompts(write_prompts(tmp_path / "p.jsonl", 6))
    with ResponseCache(tmp_path / "cache.sqlite3") as cache:
        generate(teacher_for(server), prompts, tmp_path / "a.jsonl", PARAMS, cache=cache)
        assert server.request_count == 6
        summary = generate(teacher_for(server), prompts, tmp_path / "b.jsonl", PARAMS, cache=cache)
        assert summary.cached == 12 and summary.generated == 0
        generate(
            teacher_for(server), prompts, tmp_path / "a.jsonl", PARAMS, cache=cache, overwrite=True
        )
    # A fresh process opening the same cache file: still no request.
    with ResponseCache(tmp_path / "cache.sqlite3") as cache:
        generate(teacher_for(server), prompts, tmp_path / "c.jsonl", PARAMS, cache=cache)
    assert server.request_count == 6
    assert read_out(tmp_path / "c.jsonl") == read_out(tmp_path / "b.jsonl")
    # Other sampling settings are another request.
    with ResponseCache(tmp_path / "cache.sqlite3") as cache:
        hotter = SamplingParams(temperature=1.0, n=2, max_tokens=32)
        generate(teacher_for(server), prompts, tmp_path / "d.jsonl", hotter, cache=cache)
    assert server.request_count == 12


def test_failures_go_to_the_sidecar_and_are_retried_next_run(tmp_path: Path) -> None:
    prompts = read_prompts(write_prompts(tmp_path / "p.jsonl", 4))
    out = tmp_path / "out.jsonl"
    failed = tmp_path / "out.jsonl.failed.jsonl"
    with FaultServer(FaultPlan(always="500")) as server:
        summary = generate(teacher_for(server, max_retries=1), prompts, out, PARAMS)
        assert summary.failed == {"server_error": 4} and summary.failed_samples == 8
        listed = read_out(failed)
        assert sorted(f["id"] for f in listed) == sorted(p.id for p in prompts)
        assert all(f["reason"] == "server_error" and f["attempts"] == 2 for f in listed)
        assert all(f["samples"] == [0, 1] for f in listed)
        assert out.read_text() == ""

        server.plan.always = None  # the server recovers
        summary = generate(teacher_for(server), prompts, out, PARAMS)
    assert summary.complete and summary.generated == 8
    assert not failed.exists()
    assert len(read_out(out)) == 8


def test_other_settings_are_refused_unless_overwrite(tmp_path: Path, server: FaultServer) -> None:
    prompts = read_prompts(write_prompts(tmp_path / "p.jsonl", 2))
    out = tmp_path / "out.jsonl"
    generate(teacher_for(server), prompts, out, PARAMS)
    before = out.read_bytes()
    hotter = SamplingParams(temperature=1.2, n=2, max_tokens=32)
    with pytest.raises(UserError, match=r"temperature 0\.7 -> 1\.2.*--overwrite"):
        generate(teacher_for(server), prompts, out, hotter)
    with pytest.raises(UserError, match=r"system None -> 'Be nice\.'"):
        generate(teacher_for(server), prompts, out, PARAMS, system="Be nice.")
    assert out.read_bytes() == before
    generate(teacher_for(server), prompts, out, hotter, overwrite=True)
    assert {r["sampling"]["temperature"] for r in read_out(out)} == {1.2}
    meta = json.loads((tmp_path / "out.jsonl.meta.json").read_text())
    assert meta["sampling"]["temperature"] == 1.2


def test_a_file_we_did_not_write_is_not_appended_to(tmp_path: Path, server: FaultServer) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text('{"mine": 1}\n')
    with pytest.raises(UserError, match="not written by lmdistill generate"):
        generate(
            teacher_for(server), read_prompts(write_prompts(tmp_path / "p.jsonl", 1)), out, PARAMS
        )
    assert out.read_text() == '{"mine": 1}\n'


def test_a_second_writer_on_the_same_output_is_refused(tmp_path: Path, server: FaultServer) -> None:
    out = tmp_path / "out.jsonl"
    with JsonlAppender(out), pytest.raises(UserError, match="being written by another process"):
        generate(
            teacher_for(server), read_prompts(write_prompts(tmp_path / "p.jsonl", 1)), out, PARAMS
        )


def test_top_logprobs_are_saved(tmp_path: Path, server: FaultServer) -> None:
    out = tmp_path / "out.jsonl"
    params = SamplingParams(max_tokens=8, top_logprobs=3)
    prompts = read_prompts(write_prompts(tmp_path / "p.jsonl", 1))
    generate(teacher_for(server, logprobs=True), prompts, out, params)
    [record] = read_out(out)
    assert len(record["top_logprobs"]) == len(record["token_logprobs"]) == 5
    assert all(len(position) == 3 for position in record["top_logprobs"])
    assert record["sampling"]["top_logprobs"] == 3


# ---------------------------------------------------------------------------- bad prompts


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"prompt": "ok"}\n{"prompt": "b"\n', r"p\.jsonl:2: not valid JSON"),
        (b'{"prompt": "ok"}\n{"text": "b"}\n', r"p\.jsonl:2: field 'prompt': missing"),
        (
            b'{"prompt": 3}\n',
            r"p\.jsonl:1: field 'prompt': must be a non-empty string, got a number",
        ),
        (b'{"prompt": "  "}\n', r"p\.jsonl:1: field 'prompt': must be a non-empty string"),
        (b'{"messages": "hi"}\n', r"p\.jsonl:1: field 'messages': must be a non-empty list"),
        (b'{"messages": [{"content": "x"}]}\n', r"p\.jsonl:1: field 'messages\[0\]\.role'"),
        (
            b'{"messages": [{"role": "user", "content": 5}]}\n',
            r"p\.jsonl:1: field 'messages\[0\]\.content'",
        ),
        (b'{"prompt": "a", "messages": []}\n', r"p\.jsonl:1: field 'messages': give either"),
        (b'{"prompt": "a", "id": [1]}\n', r"p\.jsonl:1: field 'id': must be a non-empty string"),
        (
            b'{"prompt": "a", "id": 1}\n{"prompt": "b", "id": "1"}\n',
            r"p\.jsonl:2: field 'id': duplicate",
        ),
        (b'{"prompt": "a"}\n{"prompt": "a"}\n', r"p\.jsonl:2: repeats the prompt of line 1"),
        (b'{"prompt": "a", "response": "ref"}\n', r"p\.jsonl:1: field 'response': is a field"),
        (b"[1, 2]\n", r"p\.jsonl:1: expected a JSON object, got list"),
        (b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n', r"p\.jsonl:2: not UTF-8 text \(byte 0xe9"),
        (b"", r"p\.jsonl: has no prompts"),
        (b"\n\n", r"p\.jsonl: has no prompts"),
    ],
)
def test_bad_prompts_name_file_line_and_field(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match=expected):
        read_prompts(path)


def test_missing_prompts_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        read_prompts(tmp_path / "nope.jsonl")


def test_byte_order_mark_and_crlf_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\r\n{"prompt": "b"}\r\n')
    assert [p.messages[0]["content"] for p in read_prompts(path)] == ["a", "b"]


def test_a_local_teacher_fills_the_same_records_and_bypasses_the_cache(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    from lmdistill.teachers.local import HFTeacher

    teacher = HFTeacher(tiny_model_dir, batch_size=4)
    prompts = read_prompts(write_prompts(tmp_path / "p.jsonl", 3))
    params = SamplingParams(temperature=0.7, n=2, max_tokens=6, seed=0)
    with ResponseCache(tmp_path / "cache.sqlite3") as cache:
        summary = generate(teacher, prompts, tmp_path / "out.jsonl", params, cache=cache)
        # A model dir's name does not pin its weights, so its answers are not cached.
        assert len(cache) == 0
    assert summary.generated == 6 and summary.complete
    records = read_out(tmp_path / "out.jsonl")
    assert pairs(records) == sorted((p.id, s) for p in prompts for s in (0, 1))
    assert all(0 < r["usage"]["completion_tokens"] <= 6 for r in records)
    assert {r["finish_reason"] for r in records} <= {"stop", "length"}
