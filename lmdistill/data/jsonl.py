"""JSONL that survives bad input and crashes.

Reading an input file names the file, line and problem of the first bad line (not UTF-8, not JSON,
not an object). Writing appends whole lines, each batch with one `write` and an `fsync`, so a crash
or `kill -9` at any moment leaves complete lines followed by at most one torn last line, which
`read_appended` cuts off before anything is appended again."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from lmdistill.errors import InputError, UserError
from lmdistill.store.atomic import write_atomic

# Its home is lmdistill.store (one atomic-write helper for every output); importable from here too.
from lmdistill.store.atomic import write_json_atomic as write_json_atomic

Record = dict[str, Any]


def _decode_line(path: Path, number: int, raw: bytes) -> Record | None:
    """One line as a JSON object; None for a blank line. Raises InputError naming path:number."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            path,
            f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
            "save the file as UTF-8",
            line=number,
        ) from None
    if number == 1:
        text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark some editors add
    if not text.strip():
        return None
    try:
        value = json.loads(text.rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        raise InputError(
            path, f"not valid JSON ({exc.msg} at column {exc.colno})", line=number
        ) from None
    if not isinstance(value, dict):
        raise InputError(path, f"expected a JSON object, got {type(value).__name__}", line=number)
    return value


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Record]]:
    """(1-based line number, record) for each non-blank line of a JSONL file."""
    path = Path(path)
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    with handle:
        for number, raw in enumerate(handle, start=1):
            record = _decode_line(path, number, raw)
            if record is not None:
                yield number, record


def first_record(path: str | Path) -> tuple[int, Record]:
    """(line number, record) of a JSONL file's first record, for a check that must not read a
    large file whole; a UserError when the file is missing or holds no record."""
    for number, record in iter_jsonl(path):
        return number, record
    raise UserError(f"{path}: no records (expected one JSON object per line)")


def describe(value: Any) -> str:
    """A JSON value's kind, for error messages ("a number", "an empty string", ...)."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return "an empty string" if not value.strip() else "a string"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        list: "a list",
        dict: "an object",
    }.get(type(value), type(value).__name__)


def chat_messages(
    path: str | Path,
    line: int,
    record: Record,
    *,
    roles: Collection[str] | None = None,
    prompt_only: bool = False,
    text_only: bool = False,
) -> list[dict[str, Any]]:
    """A record's prompt as chat messages: `prompt` (a non-empty string, one user turn) or
    `messages` (a non-empty list of {role, content}). `roles` restricts the roles allowed;
    `prompt_only` refuses a conversation ending in an assistant turn (nothing left to answer);
    `text_only` refuses OpenAI content-part lists (for code that tokenizes the text itself).
    InputError names path:line and the field, e.g. `messages[2].role`."""

    def bad(field: str, message: str) -> InputError:
        return InputError(path, message, line=line, field=field)

    if "prompt" in record and "messages" in record:
        raise bad("messages", "give either 'prompt' or 'messages', not both")
    if "prompt" in record:
        text = record["prompt"]
        if not isinstance(text, str) or not text.strip():
            raise bad("prompt", f"must be a non-empty string, got {describe(text)}")
        return [{"role": "user", "content": text}]
    if "messages" not in record:
        raise bad(
            "prompt",
            "missing: each line needs 'prompt' (a string) or 'messages' (a list of {role, content}); "
            "for data of another shape map its fields (alpaca, dolly, sharegpt or KEY=COLUMN,...)",
        )
    value = record["messages"]
    if not isinstance(value, list) or not value:
        raise bad(
            "messages", f"must be a non-empty list of {{role, content}}, got {describe(value)}"
        )
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise bad(
                f"messages[{i}]", f"must be an object {{role, content}}, got {describe(message)}"
            )
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise bad(f"messages[{i}].role", f"must be a non-empty string, got {describe(role)}")
        if roles is not None and role not in roles:
            raise bad(f"messages[{i}].role", f"must be one of {', '.join(roles)}, got {role!r}")
        content = message.get("content")
        allowed = str if text_only else str | list  # list: OpenAI content parts (text, images)
        if not isinstance(content, allowed):
            raise bad(f"messages[{i}].content", f"must be a string, got {describe(content)}")
    if prompt_only and value[-1]["role"] == "assistant":
        raise bad(
            f"messages[{len(value) - 1}]", "the prompt must not end with an assistant message"
        )
    return value


def read_appended(path: str | Path) -> list[tuple[int, Record]]:
    """The records of a file written by `JsonlAppender`, after cutting a torn last line.

    Everything after the last newline is a write that a crash interrupted: it is truncated away
    (the request behind it is redone, from the response cache when there is one). Any other bad
    line was not written by us and raises InputError, so that nothing is silently dropped."""
    path = Path(path)
    if not path.exists():
        return []
    with path.open("rb+") as handle:
        end = _end_of_last_line(handle)
        if end < handle.seek(0, os.SEEK_END):
            handle.truncate(end)
            handle.flush()
            os.fsync(handle.fileno())
        handle.seek(0)
        records = []
        for number, raw in enumerate(handle, start=1):
            record = _decode_line(path, number, raw)
            if record is not None:
                records.append((number, record))
    return records


def _end_of_last_line(handle: BinaryIO, chunk: int = 1 << 16) -> int:
    """Offset just past the file's last newline (0 if it has none), reading backwards from the end."""
    position = handle.seek(0, os.SEEK_END)
    while position > 0:
        start = max(0, position - chunk)
        handle.seek(start)
        found = handle.read(position - start).rfind(b"\n")
        if found >= 0:
            return start + found + 1
        position = start
    return 0


def encode_line(record: Record) -> bytes:
    """One JSON line, UTF-8, human-readable where possible."""
    try:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (from a model's broken bytes): escape it instead
        return (json.dumps(record, ensure_ascii=True) + "\n").encode("ascii")


class JsonlAppender:
    """Appends records to a JSONL file, crash-safely, holding an exclusive lock on it.

    The lock (flock, released by the kernel even after `kill -9`) stops a second process from
    appending to the same file at the same time, which could interleave a torn line mid-file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"{self.path}: cannot write ({exc.strerror})") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise UserError(
                f"{self.path} is being written by another process; wait for it or use another output"
            ) from None

    def append(self, records: Sequence[Record]) -> None:
        """Write `records` as one batch of lines, then fsync: on return they are on disk."""
        if not records:
            return
        data = memoryview(b"".join(encode_line(r) for r in records))
        while data:  # os.write may write less than asked (signals, huge batches)
            written = os.write(self._fd, data)
            data = data[written:]
        os.fsync(self._fd)

    def truncate(self) -> None:
        """Empty the file (for --overwrite), keeping the lock."""
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # also releases the lock
            self._fd = -1

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_jsonl_atomic(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Write a whole JSONL file so that readers see the old or the new file, never a part."""

    def write(handle: BinaryIO) -> None:
        for record in records:
            handle.write(encode_line(record))

    write_atomic(path, write)
