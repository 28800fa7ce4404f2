"""The settings of an evaluation and the shape every kind of evaluation task shares.

An `Evaluator` runs one task on one model and returns a `ModelTaskResult`. The kinds:
verifiable generation and code pass@k (`generation.py`, over the `lmdistill.tasks.Task` shape),
multiple choice by log-likelihood (`multiple_choice.py`), teacher-relative metrics
(`teacher_relative.py`), lm-eval-harness tasks (`lm_eval_adapter.py`) and tool use through the
tool loop (`tool_use.py`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from lmdistill.errors import UserError
from lmdistill.eval.results import ModelTaskResult
from lmdistill.teachers.base import SamplingParams, Teacher

if TYPE_CHECKING:
    from torch import Tensor

# Chen et al. 2021 (HumanEval) sample at T=0.2 for pass@1 and T=0.8 for pass@10/100, with
# nucleus top_p=0.95. Several samples are drawn to estimate pass@k for k > 1, so the higher one.
SAMPLING_TEMPERATURE = 0.8
SAMPLING_TOP_P = 0.95


@dataclass(frozen=True)
class EvalSettings:
    """How every task is run.

    limit: examples per task (a seeded random subset; None = the task's default or all).
    n_samples: responses per prompt; more than 1 gives pass@k for k <= n_samples.
    temperature: None picks greedy decoding (0) for one sample and 0.8 for several.
    max_tokens: per response.
    batch_size: sequences per generate call for local models.
    seed: which examples are drawn, and the sampling seed.
    confidence: coverage of every interval.
    """

    limit: int | None = None
    n_samples: int = 1
    temperature: float | None = None
    max_tokens: int = 256
    batch_size: int = 16
    seed: int = 0
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise UserError(f"limit must be >= 1, got {self.limit}")
        if self.n_samples < 1:
            raise UserError(f"n_samples must be >= 1, got {self.n_samples}")
        if self.temperature is not None and self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if self.temperature == 0 and self.n_samples > 1:
            raise UserError(
                "greedy decoding (temperature 0) gives the same answer every time, so n_samples > 1 "
                f"estimates nothing; use a temperature > 0 (e.g. {SAMPLING_TEMPERATURE})"
            )
        if self.max_tokens < 1:
            raise UserError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 < self.confidence < 1:
            raise UserError(f"confidence must be in (0, 1), got {self.confidence}")

    @property
    def resolved_temperature(self) -> float:
        if self.temperature is not None:
            return self.temperature
        return 0.0 if self.n_samples == 1 else SAMPLING_TEMPERATURE

    def sampling(self, *, greedy: bool = False) -> SamplingParams:
        """The decoding settings of the task's responses (`greedy=True`: one greedy answer,
        as the teacher-relative protocol asks)."""
        temperature = 0.0 if greedy else self.resolved_temperature
        return SamplingParams(
            temperature=temperature,
            top_p=SAMPLING_TOP_P if temperature > 0 else 1.0,
            max_tokens=self.max_tokens,
            n=1 if greedy else self.n_samples,
            seed=self.seed if temperature > 0 else None,
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "temperature": self.resolved_temperature}

    def cache_fields(self) -> dict[str, Any]:
        """The settings results depend on (batch size only reorders the work)."""
        fields = self.to_json()
        fields.pop("batch_size")
        return fields


class ScoreMemo:
    """Tensors a task computed from the teacher, kept for the next model the task scores (each
    student is scored against the same teacher log-probs), up to `budget_bytes` in all: once
    full it keeps what it holds and stores nothing more, so a set too big for it still reuses
    its first part (an LRU would evict each entry just before its reuse)."""

    def __init__(self, budget_bytes: int = 2 << 30) -> None:
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self.hits = 0
        self._items: dict[Any, list[Tensor]] = {}

    def get(self, key: Any) -> list[Tensor] | None:
        found = self._items.get(key)
        if found is not None:
            self.hits += 1
        return found

    def put(self, key: Any, tensors: list[Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors)
        if key not in self._items and self.used_bytes + size <= self.budget_bytes:
            self._items[key] = tensors
            self.used_bytes += size


@dataclass
class TeacherContext:
    """What a teacher-relative task needs besides the model it scores: the teacher model (loaded
    only when called, so cached results need none), the teacher's own result on the task, and a
    memo of the teacher's scores shared by the models the task scores after it."""

    load: Callable[[], Teacher]
    result: ModelTaskResult
    fingerprint: str
    memo: ScoreMemo | None = None


class Evaluator(ABC):
    """One evaluation task. `name` is the spec the user gave (and the report's row name)."""

    name: str
    kind: str  # "generation", "code", "multiple_choice", "teacher_relative", "lm_eval", "tool_use"
    primary: str  # the headline metric
    higher_is_better: bool = True
    needs_teacher: bool = False  # runs only with a teacher, which runs first
    description: str = ""

    def identity(self) -> dict[str, Any]:
        """What the results depend on besides the model and the settings: the spec, plus a
        content hash of any data file, so an edited file is never answered from the cache."""
        return {"spec": self.name, "kind": self.kind}

    def skip_reason(self) -> str | None:
        """Why this task cannot run here (an optional package missing), or None."""
        return None

    @abstractmethod
    def run(
        self, model: Teacher, settings: EvalSettings, *, teacher: TeacherContext | None = None
    ) -> ModelTaskResult:
        """Evaluate `model`. `teacher` is given to teacher-relative tasks for every model but the
        teacher itself."""
