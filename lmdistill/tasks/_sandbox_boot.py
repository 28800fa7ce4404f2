"""The sandbox's OS layers, run as `python -I -S -B -c <this source> CONFIG_JSON` by `sandbox.run`,
in a new session (process group) whose cwd is the sandbox's temp dir.

Not imported by lmdistill: `sandbox.py` passes this file's text with `-c`.

Each layer is applied when the kernel allows it and reported back, so a result says what
contained it (see `sandbox.SandboxResult.layers`):
  netns         a new network namespace with no interfaces up: nothing, loopback included, is
                reachable (root, or an unprivileged user namespace).
  pidns         a new PID namespace. The program is its init; when it exits or is killed, the
                kernel kills every process left in the namespace, so no fork can outlive it, even
                one that left the process group with setsid().
  private_tmp   a new mount namespace with fresh, small tmpfs over the world-writable dirs
                (/tmp, /var/tmp, /dev/shm, /run/lock): what a program writes there vanishes with it.
                (private_tmp_partial: a dir holding the interpreter itself was left as it is.)
                As `nobody`, an interpreter under a dir closed to others (pyenv's /root) is bound
                back into view here, with the rest of that dir hidden.
  private_proc  /proc shows only the sandbox's own processes (not the parent's environment).
  nobody        the program runs as user `nobody` with no groups or capabilities: it cannot write
                anything owned by root, read root's files, or signal root's processes; and
                RLIMIT_NPROC, which the kernel does not enforce for root, applies.
  rlimits       RLIMIT_AS (memory), RLIMIT_CPU (CPU seconds), RLIMIT_FSIZE (largest file),
                RLIMIT_NOFILE, RLIMIT_NPROC (processes/threads of the user), RLIMIT_CORE=0.
  pdeathsig     the program gets SIGKILL if this boot process dies, which is how the parent's
                wall-clock kill of the process group reaches it even if it changed group.

This process forks once: the child sets the limits, drops to `nobody` and execs the guarded
interpreter (`_sandbox_guard.py`); this process waits for it. It reports to the parent on the
status pipe, in JSON lines: {"layers": [...]} before the fork, {"wait_status": N} after, or
{"setup_error": "..."} when the sandbox could not be set up (then the parent raises instead of
scoring the program).
"""

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MNT_DETACH = 0x2
PR_SET_PDEATHSIG = 1
WORLD_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")

_libc = ctypes.CDLL(None, use_errno=True)


def _unshare(flags: int) -> bool:
    return _libc.unshare(flags) == 0


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    def c(s: str | None) -> bytes | None:
        return None if s is None else s.encode()

    if _libc.mount(c(source), c(target), c(fstype), flags, c(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _enter_namespaces() -> list[str]:
    """Unshare what the kernel allows; return the namespace layers obtained."""
    if os.geteuid() == 0:
        if _unshare(CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS):
            return ["netns", "pidns", "mountns"]
        if _unshare(CLONE_NEWNET):
            return ["netns"]
        return []
    # Not root: an unprivileged user namespace (where the kernel allows them) gives the same
    # network and PID isolation. Map our own uid/gid so that files we create keep their owner.
    uid, gid = os.getuid(), os.getgid()
    if not _unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID):
        return []
    try:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    except OSError:
        pass
    return ["netns", "pidns"]


def _private_tmp(workdir: str, keep: list[str]) -> bool:
    """Hide the world-writable dirs behind fresh tmpfs, keeping `workdir` (the cwd) reachable.
    A dir holding one of the `keep` paths (the interpreter) stays as it is; returns False then,
    and the guard alone stops writes there."""
    _mount("none", "/", None, MS_REC | MS_PRIVATE, None)
    here = os.stat(".")
    complete = True
    for d in WORLD_WRITABLE_DIRS:
        if not os.path.isdir(d) or os.path.islink(d):
            continue
        if any(os.path.realpath(p).startswith(d + os.sep) for p in keep):
            complete = False
            continue
        _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=1777")
    # If the temp dir lay under one of them it is now hidden, though still our cwd: bind the cwd
    # back onto the same path, so absolute paths to it ($HOME) keep working.
    try:
        same = os.path.samestat(os.stat(workdir), here)
    except OSError:
        same = False
    if not same:
        os.makedirs(workdir, exist_ok=True)
        _mount(".", workdir, None, MS_BIND, None)
        os.chdir(workdir)
    return complete


def _first_closed_ancestor(path: str) -> str | None:
    """The topmost directory on the way to `path` that other users may not enter (no o+x)."""
    parts = os.path.realpath(path).split(os.sep)[1:]
    for i in range(1, len(parts) + 1):
        d = os.sep + os.path.join(*parts[:i])
        if not os.stat(d).st_mode & 0o001:
            return d
    return None


def _expose(paths: list[str]) -> None:
    """Make each path reachable by `nobody` in this mount namespace although an ancestor is
    closed (a pyenv Python under /root, mode 700): cover the closed ancestor with an empty tmpfs
    (which also hides the rest of it) and bind the path back at the same place, so the
    interpreter's absolute RUNPATH and its prefix keep working. Needs the private /tmp."""
    for path in sorted({os.path.realpath(p) for p in paths}, key=len):
        closed = _first_closed_ancestor(path)
        if closed is None:
            continue
        stage = f"/tmp/.lmdistill-expose-{os.getpid()}"
        os.makedirs(stage)
        _mount(path, stage, None, MS_BIND | MS_REC, None)
        _mount("tmpfs", closed, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
        os.makedirs(path, exist_ok=True)
        _mount(stage, path, None, MS_BIND | MS_REC, None)
        _libc.umount2(stage.encode(), MNT_DETACH)
        os.rmdir(stage)


def _set_limits(cfg: dict) -> None:
    mem = cfg["memory_mb"] * 1024 * 1024
    limits = {
        resource.RLIMIT_AS: (mem, mem),
        # SIGXCPU at the soft limit, SIGKILL one second later.
        resource.RLIMIT_CPU: (cfg["cpu_s"], cfg["cpu_s"] + 1),
        resource.RLIMIT_FSIZE: (cfg["file_mb"] * 1024 * 1024,) * 2,
        resource.RLIMIT_NOFILE: (cfg["nofile"],) * 2,
        resource.RLIMIT_NPROC: (cfg["nproc"],) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    for which, value in limits.items():
        resource.setrlimit(which, value)


def _report(status_fd: int, **fields: object) -> None:
    """One JSON line to the parent; it merges the lines it gets."""
    os.write(status_fd, json.dumps(fields).encode() + b"\n")


def _child(cfg: dict, layers: list[str], status_fd: int) -> None:
    """In the forked child (init of the new PID namespace): limit, drop privileges, exec."""
    try:
        if "pidns" in layers and "mountns" in layers:
            _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
        _set_limits(cfg)
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setgid(cfg["gid"])
            os.setuid(cfg["uid"])
        # Set after setuid: a change of credentials clears the parent-death signal.
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        # If the boot process died before prctl took effect, stop here. (The init of a new PID
        # namespace always sees parent pid 0.)
        if os.getppid() != (0 if "pidns" in layers else cfg["boot_pid"]):
            os._exit(1)
        argv = [cfg["python"], "-I", "-S", "-B", "-c", cfg["guard_src"], cfg["script"]]
        os.execve(cfg["python"], argv, cfg["env"])
    except BaseException as e:
        _report(status_fd, setup_error=f"{type(e).__name__}: {e}", stage="child")
        os._exit(127)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    status_fd = cfg["status_fd"]
    cfg["boot_pid"] = os.getpid()
    os.set_inheritable(status_fd, False)  # closed at the exec of the program, open until then
    os.umask(0o022)
    try:
        layers = _enter_namespaces()
        if "mountns" in layers:
            complete = _private_tmp(cfg["workdir"], keep=cfg["expose"])
            if cfg["uid"] is not None:
                _expose(cfg["expose"])
            layers.remove("mountns")
            layers.append("private_tmp" if complete else "private_tmp_partial")
            if "pidns" in layers:
                layers.append("private_proc")
        if cfg["uid"] is not None:
            layers.append("nobody")
        layers += ["rlimits", "pdeathsig"]
        _report(status_fd, layers=layers)  # now, so that it arrives even if we are killed
        pid = os.fork()
    except BaseException as e:
        _report(status_fd, setup_error=f"{type(e).__name__}: {e}", stage="boot")
        sys.exit(1)
    if pid == 0:
        _child(cfg, layers, status_fd)
    os.close(0)  # only the program reads the input
    _, wait_status = os.waitpid(pid, 0)
    _report(status_fd, wait_status=wait_status)


main()
