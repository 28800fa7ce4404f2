"""lm-eval-harness tasks (EleutherAI, Gao et al. 2021) inside an lmdistill report:
`--tasks lmeval:mmlu,lmeval:arc_easy`.

Runs only where `lm_eval` is installed (`pip install lm-eval`) and its datasets are reachable (a
hub connection or a filled HF datasets cache); otherwise the task is skipped with a message and
the rest of the report goes ahead. lmdistill does not depend on lm-eval.

The local model already loaded for the other tasks is handed to lm-eval's `HFLM` wrapper, so it
is evaluated exactly as loaded. Per-document results (`log_samples`) give per-example scores,
hence Wilson or bootstrap intervals and paired retention like every other task; when a task
logs none, the harness's own standard error gives a normal interval and retention has no
interval. The headline metric is the first of `PREFERRED_METRICS` the task reports. lm-eval's
`limit` takes the first documents rather than a seeded sample.
"""

from __future__ import annotations

import importlib.util
import inspect
import time
from statistics import NormalDist
from typing import Any

from lmdistill.errors import UserError
from lmdistill.eval.base import EvalSettings, Evaluator, TeacherContext
from lmdistill.eval.generation import package_version
from lmdistill.eval.results import ModelTaskResult, Score
from lmdistill.teachers.base import Teacher

PREFERRED_METRICS: tuple[str, ...] = ("acc", "acc_norm", "exact_match", "pass@1", "f1", "bleu")
_NOT_METRICS = frozenset(
    {"doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics"}
)


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def parse_lm_eval_output(
    output: dict[str, Any], task: str, settings: EvalSettings
) -> tuple[str, dict[str, Score], list[str], list[float]]:
    """(headline metric, all metrics, example ids, per-example headline values) from what
    `lm_eval.simple_evaluate` returned for `task` (a group's subtasks are pooled)."""
    samples: dict[str, list[dict[str, Any]]] = {
        name: rows for name, rows in (output.get("samples") or {}).items() if rows
    }
    if samples:
        return _from_samples(samples, settings)
    return _from_aggregates(output, task, settings)


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _from_samples(
    samples: dict[str, list[dict[str, Any]]], settings: EvalSettings
) -> tuple[str, dict[str, Score], list[str], list[float]]:
    rows = [(name, row) for name, task_rows in sorted(samples.items()) for row in task_rows]
    # One row per document: with several filters lm-eval logs a row per filter; keep the first.
    seen: set[str] = set()
    unique = []
    for name, row in rows:
        key = f"{name}/{row.get('doc_id', len(unique))}"
        if key not in seen:
            seen.add(key)
            unique.append((key, row))
    names = [k for k, v in unique[0][1].items() if k not in _NOT_METRICS and _numeric(v)]
    names = [m for m in names if all(_numeric(row.get(m)) for _, row in unique)]
    if not names:
        raise UserError("lm-eval logged samples without a numeric per-document metric")
    primary = next((m for m in PREFERRED_METRICS if m in names), names[0])
    stat = {"confidence": settings.confidence, "seed": settings.seed}
    metrics = {m: Score.of_mean([float(row[m]) for _, row in unique], **stat) for m in names}
    ids = [key for key, _ in unique]
    return primary, metrics, ids, [float(row[primary]) for _, row in unique]


def _from_aggregates(
    output: dict[str, Any], task: str, settings: EvalSettings
) -> tuple[str, dict[str, Score], list[str], list[float]]:
    """Scores from lm-eval's aggregate table: a normal interval from the harness's standard error;
    a metric it gives none for (absent, or "N/A") is a "point" score, shown without an interval
    rather than with a zero-width one. n: the documents lm-eval scored (`n-samples`), 0 when it
    does not say (a group)."""
    table = (output.get("results") or {}).get(task)
    if not table:
        raise UserError(f"lm-eval returned no results for task '{task}'")
    counts = (output.get("n-samples") or {}).get(task) or {}
    n = counts.get("effective", counts.get("original", 0)) if isinstance(counts, dict) else 0
    n = int(n) if _numeric(n) else 0
    z = NormalDist().inv_cdf(0.5 + settings.confidence / 2)
    metrics: dict[str, Score] = {}
    for key, value in table.items():
        name, _, _filter = key.partition(",")
        if name.endswith("_stderr") or not _numeric(value) or name in metrics:
            continue
        value = float(value)
        stderr = table.get(f"{name}_stderr,{_filter}" if _filter else f"{name}_stderr")
        if _numeric(stderr) and stderr > 0:
            metrics[name] = Score(value, value - z * stderr, value + z * stderr, n, "stderr")
        else:
            metrics[name] = Score(value, value, value, n, "point")
    if not metrics:
        raise UserError(f"lm-eval reported no numeric metric for task '{task}'")
    primary = next((m for m in PREFERRED_METRICS if m in metrics), next(iter(metrics)))
    return primary, metrics, [], []


class LmEvalTask(Evaluator):
    """One lm-eval-harness task or group, by its lm-eval name."""

    kind = "lm_eval"
    primary = "acc"

    def __init__(self, spec: str, task: str) -> None:
        if not task:
            raise UserError("lmeval: needs a task name, e.g. lmeval:arc_easy")
        self.name = spec
        self.task = task
        self.description = f"lm-eval-harness task {task}"

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "lm_eval": package_version("lm_eval")}

    def skip_reason(self) -> str | None:
        if not lm_eval_available():
            return "lm-eval-harness is not installed (pip install lm-eval); skipped"
        return None

    def run(
        self, model: Teacher, settings: EvalSettings, *, teacher: TeacherContext | None = None
    ) -> ModelTaskResult:
        started = time.perf_counter()
        hf_model, tokenizer = getattr(model, "model", None), getattr(model, "tokenizer", None)
        if hf_model is None or tokenizer is None:
            raise UserError(f"task '{self.name}': lm-eval-harness runs local models only")
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=hf_model, tokenizer=tokenizer, batch_size=settings.batch_size)
        wanted = {
            "model": lm,
            "tasks": [self.task],
            "limit": settings.limit,
            "log_samples": True,
            "random_seed": settings.seed,
            "numpy_random_seed": settings.seed,
            "torch_random_seed": settings.seed,
            "fewshot_random_seed": settings.seed,
        }
        # Pass only what this lm-eval version takes (older ones lack the seed arguments).
        accepted = inspect.signature(lm_eval.simple_evaluate).parameters
        try:
            output = lm_eval.simple_evaluate(**{k: v for k, v in wanted.items() if k in accepted})
        except (KeyError, ValueError, FileNotFoundError, ConnectionError) as exc:
            raise UserError(f"lm-eval could not run '{self.task}': {exc}") from exc
        primary, metrics, ids, per_example = parse_lm_eval_output(output, self.task, settings)
        return ModelTaskResult(
            task=self.name,
            model=model.name,
            primary=primary,
            metrics=metrics,
            example_ids=ids,
            per_example=per_example,
            details={"lm_eval_version": package_version("lm_eval")},
            seconds=time.perf_counter() - started,
        )
