"""Errors a user can fix. The CLI prints each line of one (a `RecipeError` has a line per
problem) after the command's name, without a traceback. `say` is the one way a stage tells the
user something that is not an error (progress, a warning), one line on stderr."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable, Sequence
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


class RecipeError(UserError):
    """Every problem found in one recipe, one per line, each as `SOURCE: KEY: message`, so a user
    fixes them all in one edit instead of meeting them one run at a time."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)  # "key: message", without the source
        super().__init__("\n".join(f"{source}: {p}" for p in self.problems))


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest of `choices` to a mistyped `word`, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def say(line: str) -> None:
    """One line to the user on stderr, flushed at once (stdout stays for a command's result)."""
    print(line, file=sys.stderr, flush=True)
