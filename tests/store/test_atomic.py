"""lmdistill.store.atomic: an output appears whole or not at all; a torn log line is dropped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lmdistill.errors import InputError
from lmdistill.store.atomic import (
    COMPLETE_MARKER,
    CRASH_ENV,
    atomic_dir,
    dir_state,
    read_jsonl_tolerant,
    write_json_atomic,
)


class Boom(Exception):
    pass


def test_a_dir_appears_only_when_whole_with_its_marker(tmp_path: Path):
    out = tmp_path / "final"
    with atomic_dir(out) as tmp:
        (tmp / "weights.bin").write_bytes(b"w")
        assert dir_state(out) == "missing"  # nothing visible while it is written
    assert dir_state(out) == "whole"
    marker = json.loads((out / COMPLETE_MARKER).read_text())
    assert marker["files"] == ["weights.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["final"]  # no temporary sibling left


def test_a_failed_write_leaves_the_old_dir_untouched(tmp_path: Path):
    out = tmp_path / "final"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(Boom), atomic_dir(out) as tmp:
        (tmp / "a").write_text("new")
        raise Boom
    assert (out / "a").read_text() == "old" and dir_state(out) == "whole"
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_a_rewrite_replaces_the_old_dir_and_clears_a_crash_s_leftovers(tmp_path: Path):
    out = tmp_path / "final"
    (tmp_path / ".final.tmp-crashed").mkdir()  # what a kill inside atomic_dir leaves
    out.mkdir()
    (out / "stale").write_text("from an in-place write that was killed")
    assert dir_state(out) == "torn"
    with atomic_dir(out) as tmp:
        (tmp / "fresh").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == [COMPLETE_MARKER, "fresh"]
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_a_torn_last_line_is_dropped_with_one_warning(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    warnings: list[str] = []
    assert read_jsonl_tolerant(path, warn=warnings.append) == [(1, {"step": 1}), (2, {"step": 2})]
    assert len(warnings) == 1 and "torn last line" in warnings[0] and str(path) in warnings[0]
    path.write_bytes(b'{"step": 1}\n')
    assert read_jsonl_tolerant(path, warn=warnings.append) == [(1, {"step": 1})]
    assert len(warnings) == 1  # a whole file: no warning


def test_a_bad_line_that_is_not_the_last_is_an_error_naming_it(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(InputError, match=r"metrics\.jsonl:2: not valid JSON"):
        read_jsonl_tolerant(path)
    path.write_bytes(b'{"step": 1}\n[1, 2]\n')
    with pytest.raises(InputError, match=r"metrics\.jsonl:2: expected a JSON object"):
        read_jsonl_tolerant(path)


def test_crash_point_kills_at_the_nth_pass_and_runs_before_first(tmp_path: Path):
    out = tmp_path / "out.txt"
    program = (
        "from lmdistill.store.atomic import crash_point\n"
        f"f = open({str(out)!r}, 'a')\n"
        "for i in range(5):\n"
        "    crash_point('here', before=lambda: (f.write('half'), f.flush()))\n"
        "    f.write(f'{i};'); f.flush()\n"
    )
    env = {**os.environ, CRASH_ENV: "here@3"}
    result = subprocess.run([sys.executable, "-c", program], env=env, check=False)
    assert result.returncode == -signal.SIGKILL
    assert out.read_text() == "0;1;half"
    env[CRASH_ENV] = "elsewhere"
    assert subprocess.run([sys.executable, "-c", program], env=env).returncode == 0


def test_write_json_atomic_replaces_whole_files(tmp_path: Path):
    path = tmp_path / "sub" / "entry.json"
    write_json_atomic(path, {"a": 1}, indent=None)
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["entry.json"]
