"""`evaluate`: run a set of tasks on a student, its teacher and a baseline, with results cached
by (model fingerprint, task, settings), retention against the teacher, and measured cost.

    results = evaluate("runs/student", ["arithmetic_1digit", "mc-builtin", "rel"],
                       teacher="smollm2-135m-instruct", cache_dir="out/cache")
    write_report(results, "out")          # lmdistill.eval.report

Task specs (comma-separated after --tasks):
  a task name or spec     arithmetic_1digit, gsm_symbolic, humaneval, jsonl:PATH[@RULE], rg:NAME
                          (verifiable generation and code pass@k, `generation.py`)
  template:NAME:TASK      such a task asked with reasoning template NAME (step_by_step, concise,
                          system: `lmdistill.skills.reasoning.TEMPLATES`), as self-distillation
                          and reasoning traces ask it; graded by the task's own score
  mc-builtin[@letters]    multiple choice by log-likelihood, the built-in set
  mc-jsonl:PATH[@letters] multiple choice from your file (`multiple_choice.py`)
  rel | rel:TASK | rel-jsonl:PATH
                          teacher-relative metrics (needs a teacher; `teacher_relative.py`)
  ref-jsonl:PATH          ROUGE-L and perplexity against the file's responses (a text-only
                          teacher's answers; no teacher model needed)
  lmeval:TASK             an lm-eval-harness task, when lm-eval is installed
  tool-use[:TASK][:tools=NAME+NAME...][:turns=N]
                          the tool loop on a task's test split (default task tool_use, all its
                          tools, 4 turns): call validity, tool-name, argument and final-answer
                          accuracy (`tool_use.py`)

Models load lazily, on the first result the cache cannot answer, so a fully cached rerun loads
none; once loaded, a model stays loaded until the end of the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lmdistill import __version__
from lmdistill.errors import UserError, did_you_mean, say
from lmdistill.eval import cost as cost_module
from lmdistill.eval.base import EvalSettings, Evaluator, ScoreMemo, TeacherContext
from lmdistill.eval.cache import ResultCache, cache_key, model_dir, model_fingerprint
from lmdistill.eval.generation import GenerationEval, check_template
from lmdistill.eval.lm_eval_adapter import LmEvalTask
from lmdistill.eval.multiple_choice import BUILTIN_PATH, MultipleChoiceEval, split_format
from lmdistill.eval.results import ROLES, EvalResults, ModelInfo, ModelTaskResult, Score, TaskResult
from lmdistill.eval.stats import retention_interval
from lmdistill.eval.teacher_relative import BUNDLED_PROMPTS, TeacherRelativeEval
from lmdistill.eval.tool_use import ToolUseEval, is_tool_use_spec
from lmdistill.tasks import get_task, task_names
from lmdistill.tasks.base import Task
from lmdistill.teachers.base import Prices, Teacher
from lmdistill.teachers.registry import is_api_spec, load_teacher

TEMPLATE_PREFIX = "template:"
EVAL_FORMS: tuple[str, ...] = (
    "template:NAME:TASK",
    "mc-builtin[@letters]",
    "mc-jsonl:PATH[@letters]",
    "rel",
    "rel:TASK",
    "rel-jsonl:PATH",
    "ref-jsonl:PATH",
    "lmeval:TASK",
    "tool-use[:TASK][:tools=NAME+NAME...][:turns=N]",
)
Log = Callable[[str], None]


def known_task_names() -> list[str]:
    return [*task_names(), *EVAL_FORMS]


def _is_generation_task(spec: str) -> bool:
    return spec in task_names() or spec.startswith(("jsonl:", "rg:"))


def _generation_task(spec: str) -> Task:
    """`get_task(spec)`, with an unknown name reported against every form `--tasks` takes."""
    if not _is_generation_task(spec):
        hint = did_you_mean(spec, task_names())
        raise UserError(
            f"unknown task '{spec}'{hint}; choose from: {', '.join(known_task_names())}"
        )
    return get_task(spec)


def _templated(spec: str) -> GenerationEval:
    """`template:NAME:TASK`: generation task TASK asked with reasoning template NAME. The name
    comes first because task specs may hold ':' and '@' (jsonl:PATH@RULE) and template names
    hold neither."""
    name, _, task_spec = spec.removeprefix(TEMPLATE_PREFIX).partition(":")
    check_template(spec, name)
    if not _is_generation_task(task_spec):
        raise UserError(
            f"task '{spec}': expected template:NAME:TASK with TASK a generation task, got "
            f"'{task_spec}'; choose from: {', '.join(task_names())}"
        )
    return GenerationEval(spec, get_task(task_spec), template=name)


def make_evaluator(spec: str) -> Evaluator:
    """The evaluator for one task spec (see the module docstring). Reads and checks data files
    now, so a bad file fails before any model loads."""
    spec = spec.strip()
    if spec.startswith("mc-jsonl:"):
        path, fmt = split_format(spec.removeprefix("mc-jsonl:"))
        return MultipleChoiceEval(spec, Path(path).expanduser(), fmt)
    base, fmt = split_format(spec)
    if base == "mc-builtin":
        return MultipleChoiceEval(spec, BUILTIN_PATH, fmt)
    if spec == "rel":
        return TeacherRelativeEval(spec, path=BUNDLED_PROMPTS)
    if spec.startswith("rel:"):
        return TeacherRelativeEval(spec, task=_generation_task(spec.removeprefix("rel:")))
    if spec.startswith("rel-jsonl:"):
        return TeacherRelativeEval(spec, path=Path(spec.removeprefix("rel-jsonl:")).expanduser())
    if spec.startswith("ref-jsonl:"):
        path = Path(spec.removeprefix("ref-jsonl:")).expanduser()
        return TeacherRelativeEval(spec, path=path, references=True)
    if spec.startswith("lmeval:"):
        return LmEvalTask(spec, spec.removeprefix("lmeval:"))
    if is_tool_use_spec(spec):
        return ToolUseEval.from_spec(spec)
    if spec.startswith(TEMPLATE_PREFIX):
        return _templated(spec)
    return GenerationEval(spec, _generation_task(spec))


def parse_tasks(specs: Sequence[str | Evaluator]) -> list[Evaluator]:
    """Evaluators for comma-separated task lists, and evaluators the caller built (repeats of a
    name dropped, order kept)."""
    chosen: dict[str, str | Evaluator] = {}
    for item in specs:
        if isinstance(item, Evaluator):
            chosen.setdefault(item.name, item)
            continue
        for name in item.split(","):
            if name.strip():
                chosen.setdefault(name.strip(), name.strip())
    if not chosen:
        raise UserError("no tasks given; e.g. --tasks arithmetic_1digit,mc-builtin")
    return [e if isinstance(e, Evaluator) else make_evaluator(e) for e in chosen.values()]


@dataclass
class ModelSlot:
    """A model of the run, loaded on first use."""

    role: str
    spec: str
    batch_size: int
    options: Mapping[str, Any] = field(default_factory=dict)  # load_teacher's, e.g. base_url
    fingerprint: str = ""
    loads: int = 0
    same_as: ModelSlot | None = None  # an earlier slot with the same model: share its copy
    _model: Teacher | None = field(default=None, repr=False)

    def get(self) -> Teacher:
        if self.same_as is not None:
            return self.same_as.get()
        if self._model is None:
            options = {} if is_api_spec(self.spec) else {"batch_size": self.batch_size}
            self._model = load_teacher(self.spec, **{**options, **self.options})
            self.loads += 1
        return self._model

    def close(self) -> None:
        if self._model is not None:
            self._model.close()
            self._model = None


def retention(
    student: ModelTaskResult, teacher: ModelTaskResult, confidence: float, seed: int
) -> Score | None:
    """Student / teacher on the headline metric over the examples both have, with the paired
    bootstrap interval of `stats.retention_interval`; None when the teacher scores 0."""
    if student.per_example and teacher.per_example:
        teacher_by_id = dict(zip(teacher.example_ids, teacher.per_example, strict=True))
        pairs = [
            (s, teacher_by_id[i])
            for i, s in zip(student.example_ids, student.per_example, strict=True)
            if i in teacher_by_id
        ]
        if not pairs or sum(t for _, t in pairs) == 0:
            return None
        s_scores, t_scores = [p[0] for p in pairs], [p[1] for p in pairs]
        interval = retention_interval(s_scores, t_scores, confidence=confidence, seed=seed)
        return Score.of_interval(interval, len(pairs), "paired-bootstrap")
    # Aggregates only (an lm-eval task that logged no samples): the ratio, without an interval.
    s_value = student.metrics[student.primary].value
    t_value = teacher.metrics[teacher.primary].value
    if t_value == 0:
        return None
    ratio = s_value / t_value
    return Score(ratio, ratio, ratio, student.metrics[student.primary].n, "point")


def _describe(role: str, spec: str, result: ModelTaskResult) -> str:
    score = result.metrics[result.primary]
    where = "cached" if result.cached else f"{result.seconds:.1f} s"
    return f"  {role:<8} {spec}: {result.primary} {score} n={score.n} ({where})"


def evaluate(
    model: str,
    tasks: Sequence[str | Evaluator],
    *,
    teacher: str | None = None,
    teacher_options: Mapping[str, Any] | None = None,
    baseline: str | None = None,
    extra: Mapping[str, str] | None = None,
    settings: EvalSettings | None = None,
    prices: Prices | None = None,
    cache_dir: str | Path | None = None,
    measure_cost: bool = True,
    cost_tokens: int = cost_module.DEFAULT_NEW_TOKENS,
    cost_rounds: int = cost_module.DEFAULT_ROUNDS,
    run_dir: str | Path | None = None,
    log: Log | None = say,
) -> EvalResults:
    """Evaluate `model` (the student) and, when given, its `teacher` (loaded with
    `teacher_options`, e.g. a server's base_url) and a `baseline` (e.g. the
    untrained student) on `tasks` (specs as in the module docstring, or evaluators the caller
    built, e.g. self-distillation's on its configured split). `extra` adds more models to
    compare, by role name (e.g. {"sft-only": DIR, "untrained": DIR}); they are reported after the
    baseline, each with its retention against the teacher.

    cache_dir: where results are cached (None: no cache). measure_cost: time each local model
    in a subprocess (`cost.py`), `cost_rounds` interleaved rounds of `cost_tokens` tokens.
    prices: USD per million tokens, applied to the teacher's
    evaluation tokens (to the model's when there is no teacher). run_dir: a training run whose
    metrics.jsonl the report plots. log: progress lines (None: silent).
    """
    started = time.perf_counter()
    settings = settings or EvalSettings()
    say = log or (lambda _line: None)
    evaluators = parse_tasks(tasks)  # cheap checks first: no model loads for a typo
    if teacher is None:
        needing = [e.name for e in evaluators if e.needs_teacher]
        if needing:
            raise UserError(
                f"task(s) {', '.join(needing)} compare against a teacher: add --teacher"
            )
    if run_dir is not None and not Path(run_dir).is_dir():
        raise UserError(f"run dir not found: {run_dir}")
    clash = sorted(set(extra or {}) & set(ROLES))
    if clash:
        raise UserError(f"extra model roles must not reuse {', '.join(ROLES)}: got {clash}")
    specs = {"teacher": teacher, "student": model, "baseline": baseline, **(extra or {})}
    slots = {
        role: ModelSlot(
            role,
            spec,
            settings.batch_size,
            options=(teacher_options or {}) if role == "teacher" else {},
        )
        for role, spec in specs.items()
        if spec is not None
    }
    earlier: list[ModelSlot] = []
    for slot in slots.values():
        slot.fingerprint = model_fingerprint(slot.spec)
        # The same model under two roles (a baseline that is the teacher) is loaded once.
        slot.same_as = next(
            (e for e in earlier if (e.spec, e.fingerprint) == (slot.spec, slot.fingerprint)), None
        )
        if slot.same_as is None:
            earlier.append(slot)
    cache = ResultCache(cache_dir) if cache_dir is not None else None

    try:
        task_results = [_run_task(e, slots, settings, cache, say) for e in evaluators]
        cost = None
        if measure_cost:
            cost = _cost(
                slots, task_results, settings, prices, cache, cost_tokens, cost_rounds, say
            )
    finally:
        for slot in slots.values():
            slot.close()
    return EvalResults(
        models={r: ModelInfo(r, s.spec, s.fingerprint) for r, s in slots.items()},
        tasks=task_results,
        settings={
            **settings.to_json(),
            "tasks": [e.name for e in evaluators],
            "seeds": {
                "examples": settings.seed,
                "sampling": settings.seed if settings.resolved_temperature > 0 else None,
                "bootstrap": settings.seed,
            },
            "teacher_relative_decoding": "greedy",
            "cost_new_tokens": cost_tokens if measure_cost else None,
            "model_loads": {r: s.loads for r, s in slots.items()},
        },
        cost=cost,
        run_dir=str(run_dir) if run_dir is not None else None,
        seconds=time.perf_counter() - started,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        version=__version__,
    )


def _run_task(
    evaluator: Evaluator,
    slots: dict[str, ModelSlot],
    settings: EvalSettings,
    cache: ResultCache | None,
    say: Log,
) -> TaskResult:
    task = TaskResult(
        name=evaluator.name,
        kind=evaluator.kind,
        primary=evaluator.primary,
        higher_is_better=evaluator.higher_is_better,
        description=evaluator.description,
    )
    reason = evaluator.skip_reason()
    if reason is not None:
        task.skipped = reason
        say(f"{evaluator.name}: {reason}")
        return task
    say(f"{evaluator.name}:")
    memo = ScoreMemo()  # the teacher's scores, computed for the first student, kept for the rest
    for role, slot in slots.items():  # the teacher first: teacher-relative tasks need its result
        context = None
        if evaluator.needs_teacher and role != "teacher":
            teacher_slot = slots["teacher"]
            context = TeacherContext(
                teacher_slot.get, task.results["teacher"], teacher_slot.fingerprint, memo
            )
        key = cache_key(
            {
                "model": slot.fingerprint,
                "task": evaluator.identity(),
                "settings": settings.cache_fields(),
                "teacher": context.fingerprint if context else None,
            }
        )
        result = cache.get(key) if cache is not None else None
        if result is None:
            result = evaluator.run(slot.get(), settings, teacher=context)
            result.model = slot.spec
            if cache is not None:
                cache.put(key, result)
        task.results[role] = result
        say(_describe(role, slot.spec, result))
    if "teacher" in task.results:
        task.primary = task.results["teacher"].primary
        for role, result in task.results.items():
            if role != "teacher" and task.higher_is_better:
                task.retention[role] = retention(
                    result, task.results["teacher"], settings.confidence, settings.seed
                )
    else:
        task.primary = next(iter(task.results.values())).primary
    return task


def _cost(
    slots: dict[str, ModelSlot],
    tasks: list[TaskResult],
    settings: EvalSettings,
    prices: Prices | None,
    cache: ResultCache | None,
    new_tokens: int,
    rounds: int,
    say: Log,
) -> dict[str, Any]:
    """The report's cost section: the local models timed together, interleaved (or that
    measurement from the cache, for this machine and these models), API models by their tokens
    only."""
    batch_size = min(settings.batch_size, 8)
    machine = cost_module.machine()
    measured: dict[str, dict[str, Any]] = {}
    local = {
        role: slot.spec
        for role, slot in slots.items()
        if not is_api_spec(slot.spec) and slot.same_as is None
    }
    # One model of each shape is timed; the others of its shape carry its figures.
    timed_as: dict[str, str] = {}
    first_of_shape: dict[str, str] = {}
    for role, spec in list(local.items()):
        shape = cost_module.shape_identity(spec)
        if shape is None:
            continue
        if shape in first_of_shape:
            timed_as[role] = first_of_shape[shape]
            del local[role]
        else:
            first_of_shape[shape] = role
    conditions = None
    if local:
        # One key for the set: the ratios come from rounds of these models timed side by side.
        key = cache_key(
            {
                "cost": {role: slots[role].fingerprint for role in local},
                "new_tokens": new_tokens,
                "batch_size": batch_size,
                "rounds": rounds,
                "machine": machine,
            }
        )
        data = cache.get_json(key) if cache is not None else None
        if data is None:
            say(
                f"cost: timing {', '.join(local.values())} interleaved "
                f"({new_tokens} tokens per prompt, a subprocess each)"
            )
            data = cost_module.measure_models(
                local, new_tokens=new_tokens, batch_size=batch_size, rounds=rounds
            )
            data["measured_at"] = datetime.now(UTC).isoformat(timespec="seconds")
            if cache is not None:
                cache.put_json(key, data)
        conditions = {**data["conditions"], "measured_at": data["measured_at"]}
        measured.update(data["models"])
    for role, slot in slots.items():
        if is_api_spec(slot.spec):
            measured[role] = {"api": True}
        elif role in timed_as:
            path = model_dir(slot.spec)
            measured[role] = {
                **measured[timed_as[role]],
                "timed_as": timed_as[role],
                "disk_bytes": cost_module.dir_size(path) if path is not None else None,
            }
        elif slot.same_as is not None:
            measured[role] = measured[slot.same_as.role]
    measured = {role: measured[role] for role in slots}  # the slots' order
    tokens = {
        role: (
            sum(t.results[role].prompt_tokens for t in tasks if role in t.results),
            sum(t.results[role].completion_tokens for t in tasks if role in t.results),
        )
        for role in slots
    }
    priced = "teacher" if "teacher" in slots else "student"
    return cost_module.cost_report(measured, tokens, prices, priced, conditions)
