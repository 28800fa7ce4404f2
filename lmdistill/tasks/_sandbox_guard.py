"""The in-process guard of the sandbox (the inner layer), run as `python -I -S -B -c <this source>
main.py` inside the sandboxed process, in the sandbox's temp dir.

Not imported by lmdistill: `sandbox.py` reads this file's text and passes it with `-c`, so the
sandboxed user (`nobody`) never needs to read the package's files.

It installs a `sys.addaudithook` hook (PEP 578) that refuses, with PermissionError:
  - writes outside the temp dir: `open` for writing, remove/rename/mkdir/chmod/... of outside paths;
  - process creation: fork, exec, spawn, system, subprocess;
  - network: creating non-Unix sockets, connect/bind/send, DNS look-ups;
  - ctypes (which could call libc directly and step around all of the above);
  - signalling other processes.
PEP 578 says plainly that audit hooks are not a sandbox against a determined attacker; that is why
the OS layers in `_sandbox_boot.py` (namespaces, an unprivileged user, rlimits, a private /tmp)
stand behind this one. This layer's job is to fail accidents fast and with a clear message, and
to be a second wall where an OS layer is unavailable (not root, no namespaces).

Then it runs main.py as `__main__` and turns an uncaught MemoryError into exit code 86 so that the
parent can tell "ran out of memory" from any other error.
"""

import builtins
import os
import sys

MEMORY_EXIT_CODE = 86  # keep equal to sandbox.MEMORY_EXIT_CODE

_ROOT = os.path.realpath(os.getcwd())
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PROCESS_EVENTS = frozenset(
    {
        "os.exec",
        "os.fork",
        "os.forkpty",
        "os.posix_spawn",
        "os.spawn",
        "os.system",
        "os.startfile",
        "pty.spawn",
        "subprocess.Popen",
    }
)
_NETWORK_EVENTS = frozenset(
    {
        "socket.bind",
        "socket.connect",
        "socket.sendmsg",
        "socket.sendto",
        "socket.getaddrinfo",
        "socket.gethostbyaddr",
        "socket.gethostbyname",
        "socket.getnameinfo",
    }
)
_AF_UNIX = 1  # socket.AF_UNIX on Linux; importing socket here would itself raise audit events
_CTYPES_EVENTS = frozenset({"ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle"})
# event -> positions of (path, dir_fd) pairs that the event writes to.
_PATH_EVENTS = {
    "os.chmod": ((0, 2),),
    "os.chown": ((0, 3),),
    "os.chflags": ((0, None),),
    "os.lchflags": ((0, None),),
    "os.link": ((1, 3),),
    "os.mkdir": ((0, 2),),
    "os.mkfifo": ((0, 2),),
    "os.mknod": ((0, 3),),
    "os.remove": ((0, 1),),
    "os.removexattr": ((0, None),),
    "os.rename": ((0, 2), (1, 3)),
    "os.rmdir": ((0, 1),),
    "os.setxattr": ((0, None),),
    "os.symlink": ((1, 2),),
    "os.truncate": ((0, None),),
    "os.utime": ((0, 3),),
    "shutil.rmtree": ((0, 1),),
}


def _inside(path: object, dir_fd: object = None) -> bool:
    """Whether `path` (relative to `dir_fd` or the cwd) resolves inside the sandbox's temp dir."""
    if isinstance(path, int):  # an already open file descriptor
        return True
    path = os.fsdecode(path)  # type: ignore[arg-type]
    if isinstance(dir_fd, int) and dir_fd >= 0 and not os.path.isabs(path):  # <0: the cwd
        path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    full = os.path.realpath(path)
    return full == _ROOT or full.startswith(_ROOT + os.sep)


def _refuse(what: str) -> None:
    raise PermissionError(f"sandbox: {what} is not allowed")


def _hook(event: str, args: tuple) -> None:
    if event == "open":
        path, mode, flags = args
        writing = (flags or 0) & _WRITE_FLAGS or (mode and any(c in mode for c in "wax+"))
        if writing and path is not None and not _inside(path):
            _refuse(f"writing {path!r} outside the sandbox dir")
    elif event in _PATH_EVENTS:
        for index, fd_index in _PATH_EVENTS[event]:
            dir_fd = args[fd_index] if fd_index is not None and fd_index < len(args) else None
            if not _inside(args[index], dir_fd):
                _refuse(f"{event} on {args[index]!r} outside the sandbox dir")
    elif event in _PROCESS_EVENTS:
        _refuse(f"starting processes ({event})")
    elif event in _NETWORK_EVENTS:
        _refuse(f"network access ({event})")
    elif event == "socket.__new__" and args[1] != _AF_UNIX:
        _refuse("network sockets")
    elif event in _CTYPES_EVENTS:
        _refuse("ctypes")
    elif event in ("os.kill", "os.killpg") and args[0] not in (0, os.getpid()):
        _refuse("signalling other processes")


def _disable(module: object, *names: str) -> None:
    """Replace functions that raise no audit event (setsid, the raw fork_exec behind subprocess)."""

    def blocked(*_args: object, **_kwargs: object) -> None:
        _refuse("this call")

    for name in names:
        if hasattr(module, name):
            setattr(module, name, blocked)


def _main() -> None:
    import _posixsubprocess
    import posix
    import types

    _disable(_posixsubprocess, "fork_exec")
    for module in (os, posix):
        _disable(module, "setsid", "setpgid", "setpgrp", "fork", "forkpty")
    sys.addaudithook(_hook)

    # -S skips `site`, which is what defines exit() and quit(); programs do call them.
    builtins.exit = builtins.quit = sys.exit  # type: ignore[attr-defined]
    script = sys.argv[1]
    with open(script, encoding="utf-8") as f:
        code = compile(f.read(), script, "exec")
    main = types.ModuleType("__main__")
    main.__file__ = script
    sys.modules["__main__"] = main
    sys.argv = [script]
    try:
        exec(code, main.__dict__)
    except MemoryError:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        os._exit(MEMORY_EXIT_CODE)


_main()
