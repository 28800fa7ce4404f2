"""Errors a user can fix. The CLI prints them as one line, without a traceback."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A problem with the user's input or settings, with a message that says how to fix it."""


class InputError(UserError):
    """Bad content in an input file, located by file, line and field."""

    def __init__(
        self,
        path: str | Path,
        message: str,
        *,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        where = str(path) if line is None else f"{path}:{line}"
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{message}")
        self.path = str(path)
        self.line = line
        self.field = field
