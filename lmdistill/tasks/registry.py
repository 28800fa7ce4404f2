"""Task names: `get_task("gsm_symbolic")`, `get_task("jsonl:qa.jsonl@marker")`, `get_task("rg:lcm")`."""

from __future__ import annotations

from collections.abc import Callable

from lmdistill.errors import UserError, did_you_mean
from lmdistill.tasks.base import Task
from lmdistill.tasks.humaneval import HumanEval
from lmdistill.tasks.jsonl import JsonlTask, split_spec
from lmdistill.tasks.reasoning_gym import BUILTIN, any_dataset_task, builtin_task
from lmdistill.tasks.tool_use import ToolUseTask

_BUILTINS: dict[str, Callable[[], Task]] = {
    **{name: (lambda name=name: builtin_task(name)) for name in BUILTIN},
    "humaneval": HumanEval,
    "tool_use": ToolUseTask,
}


def task_names() -> list[str]:
    """The built-in task names (and the two spec forms)."""
    return [*sorted(_BUILTINS), "jsonl:PATH[@RULE]", "rg:DATASET"]


def get_task(spec: str) -> Task:
    """The task named by `spec`:

    a built-in name         arithmetic_1digit, arithmetic, gsm_symbolic, knights_knaves,
                            countdown, humaneval, tool_use
    jsonl:PATH[@RULE]       your JSONL file; RULE is number (default), marker, exact or
                            regex=PATTERN (see lmdistill.tasks.jsonl)
    rg:DATASET              any reasoning-gym dataset with its default config
    """
    if spec.startswith("jsonl:"):
        path, extraction = split_spec(spec.removeprefix("jsonl:"))
        return JsonlTask(path, extraction)
    if spec.startswith("rg:"):
        return any_dataset_task(spec.removeprefix("rg:"))
    if spec in _BUILTINS:
        return _BUILTINS[spec]()
    hint = did_you_mean(spec, _BUILTINS)
    raise UserError(f"unknown task '{spec}'{hint}; choose one of: {', '.join(task_names())}")
