"""Run untrusted Python (model-written code) in a separate, contained process.

    result = run("print(1 + 1)", timeout_s=5, memory_mb=256)
    result.status  # "ok" | "timeout" | "memory" | "error" | "killed"

Status: "ok" only when the program exited 0 within its limits; "timeout" when the wall clock
(or RLIMIT_CPU) ran out; "memory" for an uncaught MemoryError (RLIMIT_AS); "error" for any other
non-zero exit (an exception, a refused operation, sys.exit(n)); "killed" for death by a signal.

Containment comes in two kinds of layer; either alone stops the hostile programs the tests try,
and they are stacked because each has gaps the other covers.

OS layers (`_sandbox_boot.py` has the details; names as in `SandboxResult.layers`, which lists
those that applied to a run):
  - process_group: a new session, SIGKILLed as a whole at the wall-clock timeout and again
    after every run; `run` returns only once the program's pipes have closed, i.e. once every
    process that held them is gone;
  - netns, pidns: new network and PID namespaces (as root, or in an unprivileged user namespace):
    no network at all (loopback included), and no process outliving the program, even one that
    left the process group;
  - private_tmp, private_proc: a mount namespace (root) with fresh tmpfs over /tmp, /var/tmp,
    /dev/shm, /run/lock, and a /proc that shows only the sandbox's processes;
  - nobody: as root, the program runs as `nobody`, so it cannot write root's files or read
    root's secrets, and RLIMIT_NPROC is enforced (the kernel ignores it for root, so it cannot
    stop a fork bomb run as root). An interpreter under a dir closed to others (pyenv's /root)
    is bound back into view in the mount namespace;
  - rlimits: address space, CPU time, file size, open files, processes; pdeathsig;
  - scrubbed_env: only PATH, LANG, and HOME/TMPDIR pointing into a fresh temp dir (the cwd,
    removed afterwards): none of the parent's variables, so none of its secrets.

Python layer (`_sandbox_guard.py`): an audit hook (PEP 578) refusing writes outside the temp dir,
process creation, sockets, ctypes and signals to other processes. It fails accidents fast with a
clear PermissionError, and is the only write barrier for world-writable places where the mount
namespace is unavailable. PEP 578 warns that audit hooks alone are no sandbox, hence the OS layers.

The interpreter runs with `-I -S -B`: isolated (no PYTHON* variables, no user site, no cwd on
sys.path), no `site` (so no third-party packages: HumanEval-style programs need only the stdlib),
no bytecode written.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Status = Literal["ok", "timeout", "memory", "error", "killed"]

MEMORY_EXIT_CODE = 86  # the guard's exit code for an uncaught MemoryError
NOBODY_UID = NOBODY_GID = 65534
OUTPUT_LIMIT_BYTES = 64 * 1024
KILL_GRACE_S = 2.0  # after the timeout's kill, how long to wait for the killed to be gone
FILE_LIMIT_MB = 16  # RLIMIT_FSIZE: the largest file a program may write
NOFILE_LIMIT = 64
# RLIMIT_NPROC counts every process and thread of the user, system-wide, so this is shared by
# all sandboxes running at once as `nobody`; the guard forbids forking anyway.
NPROC_LIMIT = 64
_HERE = Path(__file__).parent


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (not the program's fault): never scored as 0."""


@dataclass(frozen=True)
class SandboxResult:
    status: Status  # "ok" only when the program exited 0 within its time and memory limits
    returncode: int | None  # exit code, -N for death by signal N, None if killed at the timeout
    stdout: str
    stderr: str
    duration_s: float
    truncated: bool = False  # stdout or stderr went past the cap and was cut
    layers: tuple[str, ...] = field(default=())  # which containment layers applied

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def run(
    program: str,
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    stdin: str = "",
    output_limit_bytes: int = OUTPUT_LIMIT_BYTES,
    python_guard: bool = True,
) -> SandboxResult:
    """Run `program` (Python source) in the sandbox and report how it ended.

    timeout_s: wall-clock limit; the whole process group is killed when it passes.
    memory_mb: address-space limit (RLIMIT_AS) of the program.
    stdin: text fed to the program's standard input.
    output_limit_bytes: stdout and stderr are each cut to this many bytes (the rest is drained
        and dropped, so a chatty program neither blocks nor fills our memory).
    python_guard: False leaves out the in-process audit-hook layer. Only for testing that the OS
        layers contain a program alone; never turn it off to score model output.

    Thread-safe (no `preexec_fn`): run many at once from a thread pool.
    Raises SandboxError when the sandbox could not be set up.
    """
    global _nobody_cannot_run_python
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError("timeout_s and memory_mb must be positive")
    drop_user = os.geteuid() == 0 and not _nobody_cannot_run_python
    args = (program, timeout_s, memory_mb, stdin, output_limit_bytes, python_guard)
    for attempt in range(_EXEC_TRIES):
        try:
            return _run_once(*args, drop_user=drop_user)
        except _ExecFailedAsNobody:
            # `nobody` could not start the interpreter (no mount namespace to bind it into
            # view): remember, and go on without that layer; the others still hold.
            _nobody_cannot_run_python, drop_user = True, False
        except _NobodyBusy:
            # execve fails with EAGAIN while `nobody` has RLIMIT_NPROC processes system-wide
            # (other sandboxes at that moment); they end within their timeouts.
            time.sleep(0.25 * (attempt + 1))
    raise SandboxError(
        f"could not start the program as `nobody` in {_EXEC_TRIES} tries: the user has too many "
        f"processes (RLIMIT_NPROC={NPROC_LIMIT}); are many sandboxes running at once?"
    )


_EXEC_TRIES = 5


class _ExecFailedAsNobody(Exception):
    pass


class _NobodyBusy(Exception):
    pass


_nobody_cannot_run_python = False


def _python() -> str:
    # The base interpreter, not a venv's wrapper: with -S the venv adds nothing, and `nobody`
    # may not be able to read the venv's pyvenv.cfg.
    return getattr(sys, "_base_executable", None) or os.path.realpath(sys.executable)


def _run_once(
    program: str,
    timeout_s: float,
    memory_mb: int,
    stdin: str,
    output_limit: int,
    python_guard: bool,
    *,
    drop_user: bool,
) -> SandboxResult:
    workdir = tempfile.mkdtemp(prefix="lmdistill-sbx-")
    status_r, status_w = os.pipe()
    try:
        Path(workdir, "main.py").write_text(program, encoding="utf-8")
        if drop_user:
            os.chown(workdir, NOBODY_UID, NOBODY_GID)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
        env |= {"HOME": workdir, "TMPDIR": workdir}
        guard = "_sandbox_guard.py" if python_guard else None
        cfg = {
            "python": _python(),
            "guard_src": _source(guard) if guard else _UNGUARDED_SRC,
            "script": "main.py",
            "workdir": workdir,
            "env": env,
            "status_fd": status_w,
            "memory_mb": memory_mb,
            "cpu_s": math.ceil(timeout_s) + 1,  # a backstop: the wall clock normally acts first
            "file_mb": FILE_LIMIT_MB,
            "nofile": NOFILE_LIMIT,
            "nproc": NPROC_LIMIT,
            # Dirs the interpreter needs, made reachable for `nobody` where an ancestor is closed.
            "expose": [os.path.dirname(_python()), sys.base_prefix],
            "uid": NOBODY_UID if drop_user else None,
            "gid": NOBODY_GID if drop_user else None,
        }
        start = time.monotonic()
        proc = subprocess.Popen(
            [_python(), "-I", "-S", "-B", "-c", _source("_sandbox_boot.py"), json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=env,
            start_new_session=True,  # its own process group, killed as a whole
            pass_fds=(status_w,),
        )
        os.close(status_w)
        status_w = -1
        io = _collect(proc, status_r, stdin.encode(), output_limit, start + timeout_s)
        duration = time.monotonic() - start
    finally:
        for fd in (status_r, status_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)
    return _result(io, duration, drop_user, python_guard)


@dataclass
class _Collected:
    stdout: bytes
    stderr: bytes
    status: bytes
    truncated: bool
    timed_out: bool


def _collect(
    proc: subprocess.Popen, status_fd: int, stdin: bytes, limit: int, deadline: float
) -> _Collected:
    """Feed stdin, read stdout/stderr/status (capped) until all close or the deadline passes;
    at the deadline kill the process group and keep reading until the pipes close, which happens
    only when every process holding them has exited (so nothing is left running when we return);
    then reap the boot process."""
    assert proc.stdin and proc.stdout and proc.stderr
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray(), status_fd: bytearray()}
    truncated = False
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    pending = memoryview(stdin)
    stdin_fd = proc.stdin.fileno()
    if pending:
        os.set_blocking(stdin_fd, False)
        sel.register(stdin_fd, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    open_readers = 3
    timed_out = False
    while open_readers:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if timed_out:  # killed, and still some pipe is open after the grace period
                break
            timed_out = True
            _kill_group(proc)
            deadline = time.monotonic() + KILL_GRACE_S
            continue
        for key, _ in sel.select(remaining):
            fd = key.fd
            if fd == stdin_fd:
                try:
                    pending = pending[os.write(fd, pending[:65536]) :]
                except BlockingIOError:
                    continue
                except BrokenPipeError:  # it stopped reading: fine
                    pending = pending[:0]
                if not pending:
                    sel.unregister(fd)
                    proc.stdin.close()
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                sel.unregister(fd)
                open_readers -= 1
                continue
            room = limit - len(bufs[fd]) if fd != status_fd else len(chunk)
            if room < len(chunk):
                truncated = True
            bufs[fd] += chunk[: max(room, 0)]
    sel.close()
    if not proc.stdin.closed:
        proc.stdin.close()
    _kill_group_and_reap(proc, deadline)
    return _Collected(
        stdout=bytes(bufs[out_fd]),
        stderr=bytes(bufs[err_fd]),
        status=bytes(bufs[status_fd]),
        truncated=truncated,
        timed_out=timed_out,
    )


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the whole process group. Called only while its leader (the boot process) is
    unreaped, so the group id cannot have been reused by an unrelated process."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _kill_group_and_reap(proc: subprocess.Popen, deadline: float) -> None:
    """Wait (until `deadline`) for the boot process to exit, kill what is left of its group,
    then reap it."""
    while time.monotonic() < deadline:
        # WNOWAIT: learn that it exited without reaping it (which would free its pid and pgid).
        if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            break
        time.sleep(0.005)
    _kill_group(proc)
    proc.wait()
    proc.stdout.close()  # type: ignore[union-attr]
    proc.stderr.close()  # type: ignore[union-attr]


def _result(io: _Collected, duration: float, drop_user: bool, guarded: bool) -> SandboxResult:
    report = _parse_status(io.status)
    if "setup_error" in report and not io.timed_out:
        error = report["setup_error"]
        if drop_user and report.get("stage") == "child" and error.startswith("PermissionError"):
            raise _ExecFailedAsNobody(error)
        if drop_user and report.get("stage") == "child" and error.startswith("BlockingIOError"):
            raise _NobodyBusy(error)
        raise SandboxError(f"sandbox setup failed: {error}")
    returncode: int | None = None
    if "wait_status" in report:
        returncode = os.waitstatus_to_exitcode(report["wait_status"])
    if io.timed_out:
        status: Status = "timeout"
    elif returncode is None:
        raise SandboxError(f"sandbox boot process gave no status: {io.stderr[-2000:]!r}")
    elif returncode == 0:
        status = "ok"
    elif returncode == -signal.SIGXCPU:  # RLIMIT_CPU
        status = "timeout"
    elif returncode == MEMORY_EXIT_CODE:
        status = "memory"
    elif returncode < 0:
        status = "killed"
    else:
        status = "error"
    return SandboxResult(
        status=status,
        returncode=returncode,
        stdout=io.stdout.decode("utf-8", errors="replace"),
        stderr=io.stderr.decode("utf-8", errors="replace"),
        duration_s=duration,
        truncated=io.truncated,
        layers=(
            "process_group",
            "scrubbed_env",
            *report.get("layers", ()),
            *(("python_guard",) if guarded else ()),
        ),
    )


def _parse_status(raw: bytes) -> dict:
    """The boot process's report: the last JSON line on the status pipe (the child's setup
    error, if any, comes first)."""
    report: dict = {}
    for line in raw.decode(errors="replace").splitlines():
        try:
            report |= json.loads(line)
        except json.JSONDecodeError:
            continue
    return report


_SOURCES: dict[str, str] = {}


def _source(name: str) -> str:
    if name not in _SOURCES:
        _SOURCES[name] = (_HERE / name).read_text(encoding="utf-8")
    return _SOURCES[name]


# Without the guard: run main.py as __main__ and nothing else (for testing the OS layers alone).
_UNGUARDED_SRC = (
    "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)
