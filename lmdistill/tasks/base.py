"""The one `Task` shape: the verifier that grades a benchmark is the same code that filters teacher
traces and rewards self-distillation (STYLE.md, principle 8).

    task = get_task("gsm_symbolic")
    for ex in task.examples(split="test", limit=100):
        reply = generate(ex.messages)          # any model, any teacher
        reward = task.score(ex, reply)         # float in [0, 1]
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from lmdistill.data import Message
from lmdistill.errors import UserError

Split = Literal["train", "test"]
SPLITS: tuple[Split, ...] = ("train", "test")


@dataclass(frozen=True)
class Example:
    """One prompt with what a correct response must match.

    id: stable across runs and machines (for caching generations and joining results).
    messages: the prompt as chat messages, ready for a teacher or student.
    reference: what `Task.score` compares against (a number string, text, or test code).
    metadata: JSON-serialisable details (source, config, a worked solution when one exists).
    """

    id: str
    messages: list[Message]
    reference: Any
    metadata: dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    """A set of verifiable prompts and the scorer for responses to them."""

    name: str

    @abstractmethod
    def examples(
        self, *, split: Split = "test", limit: int | None = None, seed: int = 0
    ) -> list[Example]:
        """The examples of `split`, the same list for the same arguments on every machine.
        The train and test splits never share an example."""

    @abstractmethod
    def score(self, example: Example, response: str) -> float:
        """How well `response` answers `example`: a float in [0, 1], 1.0 meaning fully correct."""

    def extract(self, response: str) -> str | None:
        """The final answer in `response` that `score` judges, None when there is none.
        Tasks that score the whole response return it stripped."""
        return response.strip() or None


def check_split(task: str, split: str) -> Split:
    if split not in SPLITS:
        raise UserError(f"task '{task}': split must be one of {', '.join(SPLITS)}, got '{split}'")
    return split  # type: ignore[return-value]


def check_limit(limit: int | None) -> None:
    if limit is not None and limit < 0:
        raise UserError(f"limit must be >= 0, got {limit}")


T = TypeVar("T")


def seeded_subset(items: Sequence[T], limit: int | None, seed: int) -> list[T]:
    """`limit` items drawn at random (seeded) from a fixed list, kept in their original order.
    A random subset rather than the head, because files are often sorted by source or difficulty."""
    if limit is None or limit >= len(items):
        return list(items)
    chosen = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in chosen]
