"""The `lmdistill serve` command: argument errors, and a real process that serves and then shuts
down cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lmdistill.cli import main

REPO = Path(__file__).parents[2]


def test_bad_max_batch_is_a_one_line_error(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["serve", "--model", str(tiny_model_dir), "--max-batch", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "lmdistill serve: error: --max-batch must be >= 1, got 0\n"


def test_unknown_model_is_a_one_line_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["serve", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmdistill serve: error: unknown teacher 'no-such-model'")
    assert err.count("\n") == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_process_answers_then_stops_on_sigterm(tiny_model_dir: Path) -> None:
    port = _free_port()
    key = "process-key-42"
    env = {**os.environ, "LMDISTILL_SERVE_API_KEY": key, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "lmdistill", "serve", "--model", str(tiny_model_dir)]
    process = subprocess.Popen(
        [*command, "--port", str(port), "--served-model-name", "tiny"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        headers = {"Authorization": f"Bearer {key}"}
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        response = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert response.status_code == 200
        assert response.json()["usage"]["completion_tokens"] == 2
        assert httpx.get(f"{base}/v1/models").status_code == 401  # the key came from the env
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    # uvicorn shuts down gracefully, then re-raises the signal so the exit status reports it.
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output
    assert key not in output


def test_help_names_the_endpoints_and_vllm_for_gpus(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "/v1/completions" in text and "/tokenize" in text
    assert "vllm serve MODEL_DIR" in text
