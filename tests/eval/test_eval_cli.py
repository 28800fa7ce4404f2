"""`lmdistill eval` as a user runs it: errors are one line without a traceback; a run on a tiny
model writes the three reports."""

import json
import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmdistill", "eval", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_clean_line(out: subprocess.CompletedProcess[str], words: str) -> None:
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert words in lines[0]


def test_bad_task_name_is_one_line(tmp_path):
    out = run_cli(
        "--model",
        "smollm2-135m-instruct",
        "--tasks",
        "arithmetic_1digit,nosuch",
        "--out",
        str(tmp_path),
    )
    assert_one_clean_line(out, "unknown task 'nosuch'")


def test_teacher_relative_without_teacher_is_one_line(tmp_path):
    out = run_cli("--model", "smollm2-135m-instruct", "--tasks", "rel", "--out", str(tmp_path))
    assert_one_clean_line(out, "add --teacher")


def test_tiny_run_writes_the_reports(tiny_model_dir, tmp_path):
    out = run_cli(
        "--model", str(tiny_model_dir), "--tasks", "mc-builtin", "--limit", "4",
        "--no-cost", "--out", str(tmp_path / "report"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["tasks"]["mc-builtin"]["n"] == 4
    assert (tmp_path / "report" / "report.html").is_file()
    assert (tmp_path / "report" / "cache").is_dir()
