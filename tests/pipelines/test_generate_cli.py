"""`lmdistill generate` as a user runs it: a subprocess against a real server on 127.0.0.1.
Exit codes, one-line errors, `kill -9` at random moments, the cache across runs, and the API key."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from faultserver import FaultPlan, FaultServer

from lmdistill.pipelines.generate import generate, read_prompts
from lmdistill.teachers.base import SamplingParams
from lmdistill.teachers.openai_api import OpenAITeacher

REPO = Path(__file__).resolve().parents[2]
SECRET = "sk-live-SECRET-0123456789abcdef"
CLI_DEFAULTS = SamplingParams(temperature=0.7)  # what the command uses without sampling flags


def write_prompts(path: Path, count: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(count)))
    return path


def cli_env(tmp_path: Path, api_key: str = SECRET) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LMDISTILL_"))}
    env["OPENAI_API_KEY"] = api_key
    env["LMDISTILL_RESPONSE_CACHE"] = str(tmp_path / "cache.sqlite3")
    env["LMDISTILL_CACHE_DIR"] = str(tmp_path / "cache-dir")
    return env


def generate_cmd(server_url: str, prompts: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lmdistill",
        "generate",
        "--teacher",
        "openai:fault",
        "--base-url",
        server_url,
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--timeout",
        "0.5",
        "--retry-base-delay",
        "0.002",
        *extra,
    ]


def run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)


def out_lines(out: Path) -> list[str]:
    return out.read_text().splitlines() if out.exists() else []


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer(FaultPlan(api_key=SECRET)) as running:
        yield running


@pytest.fixture
def existing_out(tmp_path: Path, server: FaultServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An output file from an earlier run with the command's default settings."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    out = tmp_path / "out.jsonl"
    teacher = OpenAITeacher("fault", base_url=server.base_url)
    generate(teacher, read_prompts(write_prompts(tmp_path / "done.jsonl", 3)), out, CLI_DEFAULTS)
    assert len(out_lines(out)) == 3
    return out


BAD_PROMPTS = {
    "malformed_json": (b'{"prompt": "a"}\n{"prompt": "b",\n', "p.jsonl:2: not valid JSON"),
    "missing_prompt": (
        b'{"prompt": "a"}\n{"question": "b"}\n',
        "p.jsonl:2: field 'prompt': missing",
    ),
    "wrong_type": (
        b'{"messages": [{"role": "user", "content": ["x"]}, 3]}\n',
        "p.jsonl:1: field 'messages[1]'",
    ),
    "empty_file": (b"", "p.jsonl: has no prompts"),
    "not_utf8": (b'{"prompt": "a"}\n{"prompt": "\xff\xfe"}\n', "p.jsonl:2: not UTF-8 text"),
}


def assert_clean_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lmdistill generate: error: ")
    assert expected in lines[0]
    assert SECRET not in result.stderr + result.stdout


@pytest.mark.parametrize("case", sorted(BAD_PROMPTS))
def test_bad_prompts_exit_with_one_line_and_keep_the_output(
    case: str, tmp_path: Path, server: FaultServer, existing_out: Path
) -> None:
    content, expected = BAD_PROMPTS[case]
    (tmp_path / "p.jsonl").write_bytes(content)
    before = existing_out.read_bytes()
    requests = server.request_count
    result = run(
        generate_cmd(server.base_url, tmp_path / "p.jsonl", existing_out), cli_env(tmp_path)
    )
    assert_clean_error(result, expected)
    assert existing_out.read_bytes() == before
    assert server.request_count == requests


def test_unknown_teacher(tmp_path: Path, existing_out: Path) -> None:
    before = existing_out.read_bytes()
    cmd = [sys.executable, "-m", "lmdistill", "generate", "--teacher", "no-such-teacher"]
    cmd += ["--prompts", str(write_prompts(tmp_path / "p.jsonl", 2)), "--out", str(existing_out)]
    assert_clean_error(run(cmd, cli_env(tmp_path)), "unknown teacher 'no-such-teacher'")
    assert existing_out.read_bytes() == before


def test_a_negative_price_is_one_line_before_any_request(
    tmp_path: Path, server: FaultServer, existing_out: Path
) -> None:
    before, requests = existing_out.read_bytes(), server.request_count
    prompts = write_prompts(tmp_path / "p.jsonl", 2)
    cmd = generate_cmd(server.base_url, prompts, existing_out, "--price-output", "-2")
    assert_clean_error(run(cmd, cli_env(tmp_path)), "prices must be >= 0 USD per million tokens")
    assert existing_out.read_bytes() == before and server.request_count == requests


def test_wrong_api_key(tmp_path: Path, server: FaultServer, existing_out: Path) -> None:
    before = existing_out.read_bytes()
    prompts = write_prompts(tmp_path / "more.jsonl", 6)
    wrong = "sk-wrong-key-9876543210"
    result = run(generate_cmd(server.base_url, prompts, existing_out), cli_env(tmp_path, wrong))
    assert_clean_error(result, "rejected the API key (HTTP 401)")
    assert wrong not in result.stderr + result.stdout
    assert existing_out.read_bytes() == before


def test_unreachable_server(tmp_path: Path, server: FaultServer, existing_out: Path) -> None:
    before = existing_out.read_bytes()
    url = server.base_url
    server.stop()  # same URL, nobody listening
    prompts = write_prompts(tmp_path / "more.jsonl", 5)
    result = run(generate_cmd(url, prompts, existing_out, "--max-retries", "1"), cli_env(tmp_path))
    assert_clean_error(result, "cannot reach teacher openai:fault@http://127.0.0.1")
    assert existing_out.read_bytes() == before
    failed = [json.loads(line) for line in out_lines(tmp_path / "out.jsonl.failed.jsonl")]
    assert len(failed) == 2 and {f["reason"] for f in failed} == {"connection"}


@pytest.mark.slow
def test_kill_9_at_random_moments_then_rerun_gives_each_pair_exactly_once(tmp_path: Path) -> None:
    rng = random.Random(20260427)
    n_prompts, attempts = 200, 10  # the bar: 10 kills at random moments
    prompts = write_prompts(tmp_path / "p.jsonl", n_prompts)
    out = tmp_path / "out.jsonl"
    # ~60 prompts/s at concurrency 3: each attempt below is killed within a fraction of the run.
    plan = FaultPlan(api_key=SECRET, fault_rate=0.1, latency_s=0.05, stall_s=1.0, seed=3)
    concurrency, kills = 3, 0
    with FaultServer(plan) as server:
        cmd = generate_cmd(
            server.base_url, prompts, out, "--n", "2", "--concurrency", str(concurrency)
        )
        for attempt in range(attempts):
            proc = subprocess.Popen(
                cmd,
                env=cli_env(tmp_path),
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            if attempt == 0:  # anywhere from start-up on
                time.sleep(rng.uniform(0.1, 1.0))
            else:  # in the middle of writing: wait for new lines, then a random moment later
                seen = len(out_lines(out))
                deadline = time.monotonic() + 30
                while len(out_lines(out)) <= seen and proc.poll() is None:
                    assert time.monotonic() < deadline
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 0.25))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait()
            assert b"Traceback" not in proc.stderr.read()
        final = run(cmd, cli_env(tmp_path))
        answered = server.answered_prompts()

    assert final.returncode == 0, final.stderr
    assert kills >= attempts - 1  # the run really was interrupted, repeatedly
    records = [json.loads(line) for line in out_lines(out)]  # no torn or corrupt line survives
    got = Counter((r["id"], r["sample"]) for r in records)
    assert set(got.values()) == {1}
    ids = {p.id for p in read_prompts(prompts)}
    assert set(got) == {(i, s) for i in ids for s in (0, 1)}
    # Paid at most once per prompt, plus the requests in flight when each kill landed.
    assert sum(answered.values()) <= n_prompts + kills * concurrency


def test_cache_prevents_a_second_request_across_runs_and_outputs(
    tmp_path: Path, server: FaultServer
) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 4)
    env = cli_env(tmp_path)
    first = run(generate_cmd(server.base_url, prompts, tmp_path / "a.jsonl"), env)
    assert first.returncode == 0, first.stderr
    assert server.request_count == 4
    for out in ("b.jsonl", "a.jsonl"):  # another output file; the same one started over
        again = run(generate_cmd(server.base_url, prompts, tmp_path / out, "--overwrite"), env)
        assert again.returncode == 0, again.stderr
        assert "4 from cache" in again.stdout
    assert server.request_count == 4
    no_cache = run(generate_cmd(server.base_url, prompts, tmp_path / "c.jsonl", "--no-cache"), env)
    assert no_cache.returncode == 0
    assert server.request_count == 8


def test_the_api_key_appears_nowhere(tmp_path: Path) -> None:
    prompts = write_prompts(tmp_path / "p.jsonl", 12)
    out = tmp_path / "out.jsonl"
    # Half the requests fail for good, so the failure sidecar is written too.
    plan = FaultPlan(api_key=SECRET, fault_rate=0.5, faults=("500", "429"), seed=5)
    with FaultServer(plan) as server:
        result = run(
            generate_cmd(server.base_url, prompts, out, "--max-retries", "0", "--price-input", "1"),
            cli_env(tmp_path),
        )
    assert result.returncode == 1  # some prompts failed: not an error, but not all done
    assert "run the same command again" in result.stderr
    written = [out, tmp_path / "out.jsonl.meta.json", tmp_path / "out.jsonl.failed.jsonl"]
    assert all(path.exists() for path in written)
    written += list(tmp_path.glob("cache.sqlite3*"))
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in result.stdout + result.stderr
