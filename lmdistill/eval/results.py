"""What an evaluation produces, as plain dataclasses that round-trip through JSON (the result
cache stores them, `report.json` is made from them).

    Score            one metric of one model on one task: value, interval, example count
    ModelTaskResult  everything one model did on one task: its metrics and per-example records
    TaskResult       one task across the models (teacher, student, baseline) and the retention
    EvalResults      the whole run: models, tasks, cost, settings and seeds
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from lmdistill.eval.stats import Interval, bootstrap_mean_interval, wilson_interval

ROLES: tuple[str, ...] = ("teacher", "student", "baseline")


@dataclass
class Score:
    """A metric's value with a two-sided interval (`method` says how it was computed) over `n`
    examples."""

    value: float
    low: float
    high: float
    n: int
    # "wilson", "bootstrap", "ratio-bootstrap", "stderr", "exact"; "point": a value with no
    # interval (low == high == value), shown without one.
    method: str

    @classmethod
    def of_mean(cls, scores: list[float], *, confidence: float, seed: int) -> Score:
        """The mean of per-example scores: a Wilson interval when every score is 0 or 1 (a
        proportion), else a percentile bootstrap over examples."""
        if not scores:
            raise ValueError("no scores")
        if all(s in (0.0, 1.0) for s in scores):
            interval = wilson_interval(int(sum(scores)), len(scores), confidence)
            return cls.of_interval(interval, len(scores), "wilson")
        interval = bootstrap_mean_interval(scores, confidence=confidence, seed=seed)
        return cls.of_interval(interval, len(scores), "bootstrap")

    @classmethod
    def of_interval(cls, interval: Interval, n: int, method: str) -> Score:
        return cls(interval.estimate, interval.low, interval.high, n, method)

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


@dataclass
class ModelTaskResult:
    """One model on one task.

    metrics: every metric computed, by name; `primary` names the headline one.
    per_example: the primary metric per example, in `example_ids` order (for paired retention).
    records: one JSON-able dict per example (id, response, score, ...), for inspection.
    details: counts worth showing (failed requests, responses with no answer, chance level).
    """

    task: str
    model: str  # the spec of the model
    primary: str
    metrics: dict[str, Score]
    example_ids: list[str]
    per_example: list[float]
    records: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    cached: bool = False  # loaded from the result cache in this run (not stored)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("cached")
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelTaskResult:
        data = dict(data)
        data["metrics"] = {name: Score(**s) for name, s in data["metrics"].items()}
        return cls(**data)


@dataclass
class TaskResult:
    """One task across the evaluated models.

    results: by role ("teacher", "student", "baseline"), the roles that ran.
    retention: by non-teacher role, primary metric of that role / the teacher's, on the examples
        both saw, with a paired bootstrap interval; None where undefined (no teacher, a teacher
        score of 0, or a metric where lower is better).
    skipped: why the task did not run (e.g. lm-eval-harness is not installed), else None.
    """

    name: str
    kind: str
    primary: str
    higher_is_better: bool
    description: str
    results: dict[str, ModelTaskResult] = field(default_factory=dict)
    retention: dict[str, Score | None] = field(default_factory=dict)
    skipped: str | None = None


@dataclass
class ModelInfo:
    role: str
    spec: str
    fingerprint: str


@dataclass
class EvalResults:
    """A whole evaluation: what `evaluate` returns and `write_report` renders."""

    models: dict[str, ModelInfo]
    tasks: list[TaskResult]
    settings: dict[str, Any]
    cost: dict[str, Any] | None = None  # see lmdistill.eval.cost.cost_report
    run_dir: str | None = None  # a training run whose metrics.jsonl the report plots
    seconds: float = 0.0
    created: str = ""
    version: str = ""

    def task(self, name: str) -> TaskResult:
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(name)
