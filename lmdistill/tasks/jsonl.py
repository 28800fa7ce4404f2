"""A task from your own JSONL file: `get_task("jsonl:qa.jsonl")`, or with an extraction rule,
`get_task("jsonl:qa.jsonl@marker")`.

One JSON object per line:
  "prompt": "text"                       the question, sent as one user message; or
  "messages": [{"role", "content"}, ...]  the whole prompt as chat messages
  "answer" (or "reference"): the expected answer (a string or a number)
  "id": optional, unique; defaults to "<file stem>/<line number>"
  "split": optional, "test" (the default) or "train"
  "metadata": optional object, passed through

Extraction rules (what part of a response is compared with the answer):
  number   (default) the last number of the marked answer, else of the response; equal by value
           ("1,000" == "1000.0", "3/4" == "0.75")
  marker   the marked answer ("Answer: ...", "#### ...", "\\boxed{...}", "The answer is ..."),
           compared as a number when both are numbers, else as text ignoring case, spacing and
           a final full stop
  exact    the whole response, stripped, compared like `marker`
  regex=P  the last match of regular expression P in the response (its first group if it has
           one), compared like `marker`
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmdistill.data.jsonl import chat_messages, iter_jsonl
from lmdistill.errors import InputError, UserError
from lmdistill.tasks.base import Example, Split, Task, check_limit, check_split, seeded_subset
from lmdistill.tasks.extract import answers_equal, final_number, marked_answer, numbers_equal

Rule = Literal["number", "marker", "exact", "regex"]
RULES: tuple[Rule, ...] = ("number", "marker", "exact", "regex")
_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Extraction:
    rule: Rule = "number"
    pattern: str | None = None  # for rule "regex"

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise UserError(f"extraction rule must be one of {', '.join(RULES)}, got '{self.rule}'")
        if (self.rule == "regex") != (self.pattern is not None):
            raise UserError("the regex rule needs a pattern (regex=PATTERN), and only it takes one")
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise UserError(f"bad extraction regex {self.pattern!r}: {e}") from e

    @classmethod
    def parse(cls, text: str) -> Extraction:
        """ "number", "marker", "exact" or "regex=PATTERN"."""
        rule, eq, pattern = text.partition("=")
        return cls(rule, pattern if eq else None)  # type: ignore[arg-type]

    def apply(self, response: str) -> str | None:
        if self.rule == "number":
            return final_number(response)
        if self.rule == "marker":
            return marked_answer(response)
        if self.rule == "exact":
            return response.strip() or None
        matches = list(re.finditer(self.pattern or "", response))
        if not matches:
            return None
        last = matches[-1]
        return (last.group(1) if last.re.groups else last.group(0)).strip()


def split_spec(spec: str) -> tuple[str, Extraction]:
    """ "PATH" or "PATH@RULE" (only a known rule after the last @ counts as one)."""
    path, at, rule = spec.rpartition("@")
    if at and rule.partition("=")[0] in RULES:
        return path, Extraction.parse(rule)
    return spec, Extraction()


class JsonlTask(Task):
    """Examples from a JSONL file, scored by an extraction rule (see the module docstring)."""

    def __init__(self, path: str | Path, extraction: Extraction | None = None) -> None:
        self.path = Path(path)
        self.extraction = extraction or Extraction()
        self.name = f"jsonl:{self.path}"
        self._examples = load_examples(self.path)

    def examples(
        self, *, split: Split = "test", limit: int | None = None, seed: int = 0
    ) -> list[Example]:
        check_split(self.name, split)
        check_limit(limit)
        chosen = [e for e in self._examples if e.metadata["split"] == split]
        if not chosen:
            raise UserError(
                f'{self.path} has no {split} examples (records without a "split" field are '
                'test examples; mark training ones with "split": "train")'
            )
        return seeded_subset(chosen, limit, seed)

    def extract(self, response: str) -> str | None:
        return self.extraction.apply(response)

    def score(self, example: Example, response: str) -> float:
        answer = self.extract(response)
        if answer is None:
            return 0.0
        reference = str(example.reference)
        if self.extraction.rule == "number":
            return 1.0 if numbers_equal(answer, reference) else 0.0
        return 1.0 if answers_equal(answer, reference) else 0.0


def load_examples(path: Path) -> list[Example]:
    """Parse and check the whole file; InputError names file:line and field of the first problem."""
    if not path.is_file():
        raise UserError(f"task file not found: {path}")
    examples: list[Example] = []
    ids: dict[str, int] = {}
    for number, record in iter_jsonl(path):
        example = _parse_record(path, number, record)
        if example.id in ids:
            raise InputError(
                path,
                f"duplicate id {example.id!r} (first on line {ids[example.id]})",
                line=number,
                field="id",
            )
        ids[example.id] = number
        examples.append(example)
    if not examples:
        raise InputError(path, "no records (expected one JSON object per line)")
    return examples


def _parse_record(path: Path, number: int, record: dict[str, Any]) -> Example:
    def fail(message: str, field: str | None = None) -> InputError:
        return InputError(path, message, line=number, field=field)

    messages = chat_messages(path, number, record, roles=_ROLES, prompt_only=True, text_only=True)

    if ("answer" in record) == ("reference" in record):
        raise fail("give exactly one of 'answer' or 'reference'", "answer")
    key = "answer" if "answer" in record else "reference"
    reference = record[key]
    if isinstance(reference, bool) or not isinstance(reference, str | int | float):
        raise fail(f"must be a string or a number, got {type(reference).__name__}", key)
    if isinstance(reference, str) and not reference.strip():
        raise fail("must not be empty", key)

    example_id = record.get("id", f"{path.stem}/{number}")
    if not isinstance(example_id, str | int) or isinstance(example_id, bool):
        raise fail("must be a string or an integer", "id")
    split = record.get("split", "test")
    if split not in ("train", "test"):
        raise fail(f"must be 'train' or 'test', got {split!r}", "split")
    extra = record.get("metadata", {})
    if not isinstance(extra, dict):
        raise fail("must be an object", "metadata")
    return Example(
        id=str(example_id),
        messages=messages,
        reference=reference,
        metadata={**extra, "source": str(path), "line": number, "split": split},
    )
