"""Writing outputs so that a crash (`kill -9`, power loss) at any moment leaves the old output or
the new one, never a part: the single home of that rule (issue 19).

- A file: written to a temporary sibling, fsynced, renamed over the path (`write_atomic`).
- A directory (a model dir, a report): written into a temporary sibling dir; its files and the
  dir are fsynced, a completion marker is written last, and the dir is renamed into place
  (`atomic_dir`). "Done" means the dir exists *and* holds the marker (`dir_state`): a dir that
  an older version wrote in place, and a crash left half-written, has no marker and is rebuilt.
- An appended JSONL log: every line ends in a newline, so a crash while a line is written leaves
  complete lines and one torn tail, which `read_jsonl_tolerant` drops with a one-line warning.

A crash leaves at most hidden `.NAME.tmp-*` / `.NAME.old-*` siblings, removed by the next write
of the same output. One writer per output is assumed (the trainer's main process, one pipeline).

This module imports nothing from lmdistill but `errors`, so every layer can use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Literal

from lmdistill.errors import InputError, UserError, say

# Hidden, so model fingerprints (eval.cache ignores dot files) are the same with and without it.
COMPLETE_MARKER = ".lmdistill-complete"
DIR_FORMAT = "lmdistill.dir/1"
CRASH_ENV = "LMDISTILL_TEST_CRASH_AT"

DirState = Literal["whole", "missing", "torn"]


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` through `write(handle)` into a temporary sibling, fsync, then rename it over
    `path`: readers see the old content or the new, never a mix."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise UserError(f"{path}: cannot write ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; this is an ordinary output file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    write_atomic(path, lambda handle: handle.write(data))


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, value: Any, *, indent: int | None = 2) -> None:
    """A JSON file, atomically (see `write_atomic`)."""
    text = json.dumps(value, indent=indent, ensure_ascii=False) + ("\n" if indent else "")
    write_bytes_atomic(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling dir to write `path`'s content into; on a normal exit, fsync it,
    write the completion marker last and rename it into place (replacing an old `path`). On an
    exception the temporary dir is removed and `path` is untouched."""
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    except OSError as exc:
        raise UserError(f"{final}: cannot write ({exc.strerror})") from None
    try:
        yield tmp
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        _fsync_tree(tmp)
        write_json_atomic(tmp / COMPLETE_MARKER, {"format": DIR_FORMAT, "files": files})
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; this is an ordinary output dir
        _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def dir_state(path: str | Path) -> DirState:
    """'whole' (written by `atomic_dir`, marker present), 'missing', or 'torn': a dir without the
    marker, which only an interrupted in-place write (by a version before issue 19) leaves."""
    path = Path(path)
    if not path.exists():
        return "missing"
    return "whole" if (path / COMPLETE_MARKER).is_file() else "torn"


def is_whole_dir(path: str | Path) -> bool:
    return dir_state(path) == "whole"


def remove_leftovers(path: Path) -> None:
    """Remove the temporary siblings an interrupted `atomic_dir` of `path` left behind."""
    if not path.parent.is_dir():
        return
    prefixes = (f".{path.name}.tmp-", f".{path.name}.old-")
    for sibling in path.parent.iterdir():
        if sibling.name.startswith(prefixes):
            shutil.rmtree(sibling, ignore_errors=True)


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`. POSIX cannot rename a dir over a non-empty one, so an old `final`
    is first renamed aside: a crash between the two renames leaves no `final` (rebuilt next time,
    like a missing output) and never a mix of old and new files."""
    aside = None
    if final.is_dir() and not final.is_symlink():
        aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, aside)  # over the empty dir mkdtemp made
    elif final.exists() or final.is_symlink():
        final.unlink()
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """fsync every file and dir under `root`, so the rename that follows publishes durable data."""
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(directory))


def fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX: the directory entry lives in the directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_jsonl_tolerant(
    path: str | Path, *, warn: Callable[[str], None] | None = None
) -> list[tuple[int, dict[str, Any]]]:
    """(1-based line number, record) for each line of an appended JSONL log (one object per
    line, each line ending in a newline).

    Bytes after the last newline are a line a crash interrupted: dropped, with one warning line
    (`warn`, default stderr). Any other bad line was not torn by a crash, so it is an InputError
    naming the file and line rather than something silently skipped."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    end = data.rfind(b"\n") + 1
    if data[end:].strip():
        (warn or say)(
            f"{path}: dropped a torn last line ({len(data) - end} bytes; "
            "a crash while it was written)"
        )
    records = []
    for number, raw in enumerate(data[:end].splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(path, f"not valid JSON ({exc})", line=number) from None
        if not isinstance(value, dict):
            raise InputError(path, "expected a JSON object", line=number)
        records.append((number, value))
    return records


_reached: dict[str, int] = {}


def crash_point(name: str, *, before: Callable[[], None] | None = None) -> None:
    """For tests: SIGKILL this process the N-th time it reaches point `name`, when the environment
    variable LMDISTILL_TEST_CRASH_AT is `name` or `name@N` (N: 1 when omitted); `before` runs
    first (e.g. to leave half a line on disk). A real SIGKILL, so no `finally`, `except` or
    atexit code runs: the disk then holds exactly what a `kill -9` at that moment leaves.
    Unset (always, outside tests), this is one dict lookup."""
    wanted = os.environ.get(CRASH_ENV)
    if not wanted:
        return
    target, _, nth = wanted.partition("@")
    if target != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(nth or 1):
        if before is not None:
            before()
        os.kill(os.getpid(), signal.SIGKILL)
