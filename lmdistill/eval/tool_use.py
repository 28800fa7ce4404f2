"""Tool use as an evaluation task: the tool loop (`lmdistill.skills.tool_use`) on a task's test
split, scored with the four tool-use metrics.

Spec: `tool-use[:TASK][:tools=NAME+NAME...][:turns=N]`

  tool-use                              the `tool_use` task, all of its tools, at most 4 turns
  tool-use:tools=calculator+lookup      only those tools (joined by `+`: `,` separates tasks)
  tool-use:tool_use:turns=2             at most 2 model turns per trace
  tool-use:jsonl:qa.jsonl:tools=lookup  any task spec; its examples need
                                        `metadata.expected_call` for the name/argument metrics

The options come last, in any order. Without `tools=`, the task's own tools are used (the
bundled calculator, convert_units and lookup for `tool_use`).

Each example gets one greedy trace (`max_tokens` per turn, the settings' `limit` and `seed`
choose the examples). Per trace, each metric is 0 or 1:

  call_validity          at least one call, and every call parsed and fit its schema
  tool_name_accuracy     the first call named the expected tool
  argument_accuracy      ... with the expected arguments (numbers by value)
  final_answer_accuracy  the trace ended with an answer the task scores 1.0 (the headline)

so each rate comes with a Wilson interval, and retention pairs the student's traces with the
teacher's by example. The records are the traces (messages in the OpenAI shape, status, error,
the four values), which the report writes under samples/. The result's prompt and completion
tokens sum every turn of every trace (each turn sends the whole conversation), for the cost
section.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from lmdistill.errors import UserError
from lmdistill.eval.base import EvalSettings, Evaluator, TeacherContext
from lmdistill.eval.generation import GenerationEval
from lmdistill.eval.results import ModelTaskResult, Score
from lmdistill.skills.tool_use import TOOL_METRIC_NAMES, check_trace, run_tool_loops, trace_scores
from lmdistill.tasks.base import Example, Task
from lmdistill.tasks.registry import get_task
from lmdistill.tasks.tools import ToolRegistry, default_tools, tool_subset
from lmdistill.teachers.base import Teacher

PREFIX = "tool-use"
DEFAULT_TASK = "tool_use"
DEFAULT_MAX_TURNS = 4
_OPTIONS = ("tools", "turns")
_OPTION_LIKE = re.compile(r"[a-z_]+=[^./]*")  # a mistyped option, not a file name with "="


@dataclass(frozen=True)
class ToolUseSpec:
    """The parts of a `tool-use` spec; `str()` writes the shortest spec that reads back the same.

    tools: names of the tools offered (empty: all of the task's tools)."""

    task: str = DEFAULT_TASK
    tools: tuple[str, ...] = ()
    max_turns: int = DEFAULT_MAX_TURNS

    @classmethod
    def parse(cls, spec: str) -> ToolUseSpec:
        """The parts of `spec` (see the module docstring); UserError for a malformed one."""
        if spec == PREFIX:
            return cls()
        if not spec.startswith(PREFIX + ":"):
            raise UserError(f"task '{spec}': a tool-use spec starts with '{PREFIX}'")
        segments = spec.removeprefix(PREFIX + ":").split(":")
        options: dict[str, str] = {}
        while segments and segments[-1].partition("=")[0] in _OPTIONS:
            key, _, value = segments.pop().partition("=")
            if key in options:
                raise UserError(f"task '{spec}': '{key}=' given twice")
            options[key] = value
        if segments and _OPTION_LIKE.fullmatch(segments[-1]):
            raise UserError(
                f"task '{spec}': unknown option '{segments[-1].partition('=')[0]}='; "
                f"options: {', '.join(o + '=' for o in _OPTIONS)}"
            )
        return cls(
            task=":".join(segments) or DEFAULT_TASK,
            tools=_tool_names(spec, options["tools"]) if "tools" in options else (),
            max_turns=_turns(spec, options["turns"]) if "turns" in options else DEFAULT_MAX_TURNS,
        )

    def __str__(self) -> str:
        parts = [PREFIX]
        if self.task != DEFAULT_TASK:
            parts.append(self.task)
        if self.tools:
            parts.append("tools=" + "+".join(self.tools))
        if self.max_turns != DEFAULT_MAX_TURNS:
            parts.append(f"turns={self.max_turns}")
        return ":".join(parts)


def _tool_names(spec: str, value: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in value.split("+"))
    if not all(names):
        raise UserError(f"task '{spec}': tools= needs tool names joined by '+', got {value!r}")
    return names


def _turns(spec: str, value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"task '{spec}': turns= needs a whole number >= 1, got {value!r}")
    return int(value)


def is_tool_use_spec(spec: str) -> bool:
    return spec == PREFIX or spec.startswith(PREFIX + ":")


class ToolUseEval(Evaluator):
    """A task's test examples through the tool loop (see the module docstring)."""

    kind = "tool_use"
    primary = "final_answer_accuracy"
    description = "the tool loop, greedy: call validity, tool name, arguments, final answer"

    def __init__(
        self, spec: str, task: Task, tools: ToolRegistry, max_turns: int = DEFAULT_MAX_TURNS
    ) -> None:
        if max_turns < 1:
            raise UserError(f"task '{spec}': max_turns must be >= 1, got {max_turns}")
        self.name = spec
        self.task = task
        self.tools = tools
        self.max_turns = max_turns

    @classmethod
    def from_spec(cls, spec: str) -> ToolUseEval:
        """The evaluator `spec` names; a bad spec or an unknown tool fails now, before any
        model loads."""
        parts = ToolUseSpec.parse(spec)
        try:
            task = get_task(parts.task)
            tools = tool_subset(parts.tools, getattr(task, "tools", None) or default_tools())
        except UserError as exc:
            raise UserError(f"task '{spec}': {exc}") from None
        return cls(spec, task, tools, parts.max_turns)

    def identity(self) -> dict[str, Any]:
        identity = super().identity()
        identity["examples"] = GenerationEval(self.name, self.task).identity()
        identity["tools"] = self.tools.schemas
        identity["max_turns"] = self.max_turns
        return identity

    def run(
        self, model: Teacher, settings: EvalSettings, *, teacher: TeacherContext | None = None
    ) -> ModelTaskResult:
        started = time.perf_counter()
        examples = self.task.examples(split="test", limit=settings.limit, seed=settings.seed)
        if not examples:
            raise UserError(f"task '{self.name}' has no test examples")
        traces = run_tool_loops(
            model,
            examples,
            self.tools,
            max_turns=self.max_turns,
            params=settings.sampling(greedy=True),
            split="test",
            task=self.task.name,
        )
        records = [self._record(e, t) for e, t in zip(examples, traces, strict=True)]
        metrics = {
            name: Score.of_mean(
                [r[name] for r in records], confidence=settings.confidence, seed=settings.seed
            )
            for name in TOOL_METRIC_NAMES
        }
        return ModelTaskResult(
            task=self.name,
            model=model.name,
            primary=self.primary,
            metrics=metrics,
            example_ids=[e.id for e in examples],
            per_example=[r[self.primary] for r in records],
            records=records,
            details=self._details(records),
            prompt_tokens=sum(t["usage"]["prompt_tokens"] for t in traces),
            completion_tokens=sum(t["usage"]["completion_tokens"] for t in traces),
            seconds=time.perf_counter() - started,
        )

    def _record(self, example: Example, trace: dict[str, Any]) -> dict[str, Any]:
        """One trace as a report sample: the conversation, how it ended, the four values."""
        check = check_trace(trace, self.tools)
        return {
            "id": example.id,
            "prompt": example.messages[-1]["content"],
            "messages": trace["messages"],
            "expected_call": example.metadata.get("expected_call"),
            "reference": str(example.reference),
            "answer": check.answer,
            "status": trace["status"],
            "error": trace["error"],
            "problem": check.problem,
            **trace_scores(trace, check, self.tools, self.task.score),
        }

    def _details(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """The tools and turn limit, and how the traces ended (counts by status and problem)."""
        statuses = Counter(r["status"] for r in records)
        problems = Counter(r["problem"] for r in records if r["problem"])
        return {
            "tools": "+".join(self.tools.names),
            "max_turns": self.max_turns,
            **{f"ended_{status}": n for status, n in sorted(statuses.items())},
            **{f"problem_{problem}": n for problem, n in sorted(problems.items())},
        }
