"""Hostile programs, each contained and each scored as a failure.

Most run twice: with every layer, and with the in-process guard off (`python_guard=False`), to
show that the OS layers alone contain them too. The OS-only runs are skipped where the kernel
gave no PID namespace (not root and no user namespaces), since without it nothing there could
stop a fork bomb from outliving the test."""

from __future__ import annotations

import os
import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lmdistill.tasks.sandbox import run

_probe = run("pass", timeout_s=5)
HAS_PIDNS = "pidns" in _probe.layers
guard_modes = pytest.mark.parametrize(
    "guard",
    [
        True,
        pytest.param(
            False,
            marks=pytest.mark.skipif(not HAS_PIDNS, reason="no PID namespace: OS layers partial"),
        ),
    ],
    ids=["all_layers", "os_layers_only"],
)


def live_processes_with_home(workdir: str) -> list[int]:
    """Processes (zombies aside) whose environment says HOME=workdir: the sandbox's own."""
    marker = f"HOME={workdir}\0".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z" and marker in Path(f"/proc/{entry}/environ").read_bytes():
                found.append(int(entry))
        except (OSError, IndexError):
            continue
    return found


def test_normal_program_passes_with_its_output_and_input():
    r = run("import sys\nprint('hi', sys.stdin.read().upper())", stdin="abc")
    assert r.status == "ok" and r.ok
    assert r.returncode == 0
    assert r.stdout == "hi ABC\n"
    assert r.duration_s < 5


def test_program_can_use_its_own_dir_and_exit_codes():
    r = run("open('f.txt', 'w').write('x'); print(open('f.txt').read()); exit(0)")
    assert r.status == "ok" and r.stdout == "x\n"
    assert run("import sys; sys.exit(3)").returncode == 3


def test_raising_program_is_an_error_with_its_traceback():
    r = run("def f():\n    raise ValueError('boom')\nf()")
    assert r.status == "error"
    assert r.returncode == 1
    assert "ValueError: boom" in r.stderr


@guard_modes
def test_infinite_loop_times_out(guard):
    r = run("while True:\n    pass", timeout_s=1, python_guard=guard)
    assert r.status == "timeout"
    assert 0.9 < r.duration_s < 3


@guard_modes
def test_fork_bomb_is_contained_and_leaves_no_process(guard):
    program = (
        "import os, sys, time\n"
        "print(os.getcwd(), flush=True)\n"
        "while True:\n"
        "    try:\n"
        "        os.fork()\n"
        "    except OSError:\n"
        "        time.sleep(0.01)\n"
    )
    r = run(program, timeout_s=1, python_guard=guard)
    assert r.status != "ok"
    workdir = r.stdout.split()[0]
    assert live_processes_with_home(workdir) == []
    assert not Path(workdir).exists()


@guard_modes
def test_child_that_leaves_the_process_group_dies_with_the_program(guard):
    program = (
        "import os, time\n"
        "print(os.getcwd(), flush=True)\n"
        "try:\n"
        "    if os.fork() == 0:\n"
        "        os.setsid()\n"
        "        time.sleep(60)\n"
        "except OSError:\n"
        "    pass\n"
        "print('parent done')\n"
    )
    r = run(program, timeout_s=2, python_guard=guard)
    assert live_processes_with_home(r.stdout.split()[0]) == []


@guard_modes
def test_memory_hog_is_stopped(guard):
    r = run("x = bytearray(4 * 1024**3)\nprint('allocated')", memory_mb=256, python_guard=guard)
    assert r.status == ("memory" if guard else "error")
    assert "allocated" not in r.stdout
    assert "MemoryError" in r.stderr


@guard_modes
def test_writing_outside_the_temp_dir_is_contained(guard):
    target = Path(f"/tmp/lmdistill_escape_{secrets.token_hex(8)}")
    r = run(f"open({str(target)!r}, 'w').write('escaped')", python_guard=guard)
    assert not target.exists()
    if guard:  # without the guard the write lands in the private /tmp and vanishes
        assert r.status == "error" and "PermissionError" in r.stderr


@guard_modes
def test_deleting_outside_the_temp_dir_is_contained(guard, tmp_path: Path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.chmod(tmp_path, 0o777)  # so only the sandbox, not file permissions, protects it
    os.chmod(victim, 0o666)
    r = run(f"import os\nos.remove({str(victim)!r})", python_guard=guard)
    assert r.status == "error"
    assert victim.read_text() == "keep me"


@guard_modes
def test_socket_to_a_local_listener_never_connects(guard):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        program = (
            "import socket\n"
            f"s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "s.sendall(b'leak')\n"
        )
        r = run(program, timeout_s=3, python_guard=guard)
        server.settimeout(0.3)
        with pytest.raises(TimeoutError):
            server.accept()
    assert r.status == "error"


@guard_modes
def test_parent_secrets_do_not_reach_the_program(guard, monkeypatch):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("LMDISTILL_TEST_SECRET", secret)
    program = (
        "import os\n"
        "print(dict(os.environ))\n"
        f"for path in ('/proc/{os.getpid()}/environ', '/proc/1/environ', '/proc/self/environ'):\n"
        "    try:\n"
        "        print(open(path, 'rb').read())\n"
        "    except OSError as e:\n"
        "        print(path, e)\n"
        "print(os.environ['LMDISTILL_TEST_SECRET'])\n"
    )
    r = run(program, python_guard=guard)
    assert secret not in r.stdout and secret not in r.stderr
    assert r.status == "error"  # the KeyError at the end
    assert "HOME" in r.stdout and "PATH" in r.stdout


def test_process_creation_is_refused_by_the_guard():
    r = run("import subprocess\nsubprocess.run(['true'])")
    assert r.status == "error" and "PermissionError" in r.stderr


def test_output_is_capped():
    r = run("print('x' * 1_000_000)", output_limit_bytes=1000)
    assert r.status == "ok"
    assert r.truncated and len(r.stdout) == 1000


def test_temp_dir_is_fresh_and_removed():
    first = run("import os; print(os.getcwd(), os.listdir('.'))").stdout.split()
    second = run("import os; print(os.getcwd())").stdout.split()
    assert first[0] != second[0]
    assert first[1] == "['main.py']"
    assert not Path(first[0]).exists() and not Path(second[0]).exists()


def test_runs_concurrently_from_threads():
    start = time.monotonic()
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda i: run(f"print({i} * 2)"), range(6)))
    assert [r.stdout.strip() for r in results] == [str(i * 2) for i in range(6)]
    assert time.monotonic() - start < 10


@pytest.mark.skipif(os.geteuid() != 0, reason="the full set of OS layers needs root")
def test_all_layers_apply_as_root():
    expected = {"netns", "pidns", "private_tmp", "private_proc", "nobody", "rlimits"}
    assert expected <= set(_probe.layers)
    assert "python_guard" in _probe.layers
