"""Procedural, verifiable tasks from reasoning-gym (Open-Thought, `pip install reasoning-gym`):
endless fresh examples from a seed, each graded by the dataset's own `score_answer`.

Built-in configurations (the names `get_task` knows):

  arithmetic_1digit  basic_arithmetic, 2 terms of "1 digit" (reasoning-gym draws them from
                     0..10), operators + - *, no parentheses, no negation: "Calculate 6 * 7."
                     The easy end, meant to be within reach of a ~100M-parameter teacher (363
                     distinct questions in all: 11 x 11 operands x 3 operators).
  arithmetic         basic_arithmetic, 2-4 terms of 1-3 digits, + - * / (exact integer division),
                     parentheses allowed: "Calculate -( 37 + 5 ) * 12 / 6."
  gsm_symbolic       gsm_symbolic (GSM-Symbolic templates, Mirzadeh et al. 2024), difficulty 1.0:
                     GSM8K-style word problems with an integer answer.
  knights_knaves     knights_knaves (Smullyan's puzzles), default config (2 people): who is lying?
                     Graded by its own scorer, which accepts the assignments in any order.
  countdown          countdown, default config (3-6 numbers): reach a target with + - * /; any
                     correct expression using each number once scores, checked by evaluating it.

`rg:NAME` builds any other reasoning-gym dataset with its default config.

Seeds and splits. reasoning-gym makes item i of seed s from Random(s + i), so item i of seed 1
is item i + 1 of seed 0. Our `seed` is therefore hashed to a far-away reasoning-gym seed, and a
generated question belongs to `test` or `train` by a hash of its text (not by index ranges), so
the splits cannot share a question whatever the seeds and limits. Duplicates within a split are
dropped.

Scoring. The dataset's `score_answer(extracted_answer, entry)` decides. Several give partial
credit for wrong answers (basic_arithmetic: len(oracle)/len(answer) when the oracle is a
substring, so "30" for "3" scores 0.5; countdown: 0.05 for a well-formed wrong expression;
gsm_symbolic: 0.01), which would count wrong traces as partly right in a filter and a pass
rate, so by default only full marks score 1.0 and everything else 0.0 (`partial_credit=True`
keeps the dataset's own values, e.g. for shaped rewards).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from lmdistill.errors import UserError
from lmdistill.tasks.base import Example, Split, Task, check_limit, check_split
from lmdistill.tasks.extract import final_number, marked_answer

AnswerKind = Literal["number", "text"]

# The virtual size of each reasoning-gym dataset we draw from; item i is the same for any size
# >= i, except that gsm_symbolic picks its templates from `size`, so it is fixed once here.
_POOL = 100_000
DEFAULT_LIMIT = 500
_TEST_SHARE = 0.5  # of the question space; each split takes the questions hashed to it

_NUMBER_PROMPT = (
    "{question}\n\nSolve the problem step by step. "
    "Then give the final answer on the last line in the form 'Answer: <number>'."
)
_TEXT_PROMPT = (
    "{question}\n\nThink it through step by step. "
    "Then give the final answer on the last line in the form 'Answer: <answer>'."
)


@dataclass(frozen=True)
class GymConfig:
    """Which reasoning-gym dataset, with which settings, and what kind of answer it wants."""

    dataset: str
    options: dict[str, Any] = field(default_factory=dict)
    answer: AnswerKind = "number"
    description: str = ""


BUILTIN: dict[str, GymConfig] = {
    "arithmetic_1digit": GymConfig(
        "basic_arithmetic",
        {
            "min_terms": 2,
            "max_terms": 2,
            "min_digits": 1,
            "max_digits": 1,
            "operators": ("+", "-", "*"),
            "allow_parentheses": False,
            "allow_negation": False,
        },
        description="two 1-digit numbers, + - *",
    ),
    "arithmetic": GymConfig(
        "basic_arithmetic",
        {"min_terms": 2, "max_terms": 4, "min_digits": 1, "max_digits": 3},
        description="2-4 terms of 1-3 digits, + - * /, parentheses",
    ),
    "gsm_symbolic": GymConfig(
        "gsm_symbolic", {"difficulty": 1.0}, description="GSM8K-style word problems"
    ),
    "knights_knaves": GymConfig("knights_knaves", answer="text", description="who is lying"),
    "countdown": GymConfig(
        "countdown", answer="text", description="reach a target number with + - * /"
    ),
}


def _import_reasoning_gym() -> Any:
    try:
        import reasoning_gym
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise UserError("reasoning-gym tasks need `pip install reasoning-gym`") from e
    return reasoning_gym


@functools.lru_cache(maxsize=32)
def _dataset(name: str, options_json: str, seed: int) -> Any:
    rg = _import_reasoning_gym()
    try:
        return rg.create_dataset(name, size=_POOL, seed=seed, **json.loads(options_json))
    except ValueError as e:
        raise UserError(f"reasoning-gym: {e}") from e


def _gym_seed(seed: int) -> int:
    """Our seed -> a pseudo-random 31-bit reasoning-gym seed, so that adjacent seeds of ours do
    not give shifted copies of one stream (see the module docstring)."""
    digest = hashlib.sha256(f"lmdistill-seed:{seed}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


def _split_of(question: str) -> Split:
    digest = hashlib.sha256(question.encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < _TEST_SHARE else "train"


def _json_safe(value: Any) -> Any:
    """reasoning-gym metadata holds tuples, Fractions and numpy scalars: keep it as JSON would."""
    return json.loads(json.dumps(value, default=str))


class ReasoningGymTask(Task):
    """A reasoning-gym dataset behind the `Task` shape (see the module docstring)."""

    def __init__(self, name: str, config: GymConfig, *, partial_credit: bool = False) -> None:
        self.name = name
        self.config = config
        self.partial_credit = partial_credit
        self._options = json.dumps(config.options, sort_keys=True)

    def examples(
        self, *, split: Split = "test", limit: int | None = None, seed: int = 0
    ) -> list[Example]:
        check_split(self.name, split)
        check_limit(limit)
        want = DEFAULT_LIMIT if limit is None else limit
        gym_seed = _gym_seed(seed)
        dataset = _dataset(self.config.dataset, self._options, gym_seed)
        out: list[Example] = []
        seen: set[str] = set()
        # Each draw lands in the split with probability _TEST_SHARE, and small question spaces
        # (arithmetic_1digit: 363 questions) run out of new ones: give up after enough draws.
        max_draws = 20 * want + 1000
        index = 0
        while len(out) < want and index < min(max_draws, _POOL):
            entry = dataset[index]
            question = entry["question"]
            if question not in seen and _split_of(question) == split:
                seen.add(question)
                out.append(self._example(entry, gym_seed, index))
            index += 1
        if len(out) < want and limit is not None:
            raise UserError(
                f"task '{self.name}' has only {len(out)} distinct {split} questions "
                f"(asked for {limit}); use a smaller limit or a harder config"
            )
        return out

    def _example(self, entry: dict[str, Any], gym_seed: int, index: int) -> Example:
        prompt = _NUMBER_PROMPT if self.config.answer == "number" else _TEXT_PROMPT
        digest = hashlib.sha256(entry["question"].encode()).hexdigest()[:12]
        return Example(
            id=f"{self.name}/{digest}",
            messages=[{"role": "user", "content": prompt.format(question=entry["question"])}],
            reference=entry["answer"],
            metadata={
                "source": "reasoning_gym",
                "dataset": self.config.dataset,
                "options": json.loads(self._options),
                "gym_seed": gym_seed,
                "index": index,  # with dataset, options, gym_seed: regenerates the entry
                "question": entry["question"],
                "rg_metadata": _json_safe(entry.get("metadata", {})),
            },
        )

    def extract(self, response: str) -> str | None:
        """Numbers: the last number of the marked answer, else of the response (canonical form).
        Text: the marked answer, else the last non-empty line."""
        if self.config.answer == "number":
            return final_number(response)
        marked = marked_answer(response)
        if marked:
            return marked
        lines = [line.strip() for line in response.strip().splitlines() if line.strip()]
        return lines[-1] if lines else None

    def score(self, example: Example, response: str) -> float:
        entry = self._entry(example)
        value = float(_dataset_for(example).score_answer(self.extract(response), entry))
        if self.partial_credit:
            return min(max(value, 0.0), 1.0)
        return 1.0 if value >= 1.0 else 0.0

    def _entry(self, example: Example) -> dict[str, Any]:
        """The reasoning-gym entry behind `example`, regenerated (its scorers read fields that
        do not survive JSON, and examples come back from caches as JSON)."""
        entry = _dataset_for(example)[example.metadata["index"]]
        if entry["answer"] != example.reference:
            raise UserError(
                f"example {example.id} no longer matches reasoning-gym's output for its seed and "
                "index (a different reasoning-gym version?); regenerate the examples"
            )
        return entry


def _dataset_for(example: Example) -> Any:
    meta = example.metadata
    options = json.dumps(meta["options"], sort_keys=True)
    return _dataset(meta["dataset"], options, meta["gym_seed"])


def builtin_task(name: str, **kwargs: Any) -> ReasoningGymTask:
    return ReasoningGymTask(name, BUILTIN[name], **kwargs)


def any_dataset_task(dataset: str) -> ReasoningGymTask:
    """`rg:NAME`: any reasoning-gym dataset with its default config; a number task when its
    first answer is a number."""
    rg = _import_reasoning_gym()
    if dataset not in rg.factory.DATASETS:
        raise UserError(
            f"reasoning-gym has no dataset '{dataset}'; see reasoning_gym.factory.DATASETS"
        )
    first = _dataset(dataset, "{}", 0)[0]["answer"]
    kind: AnswerKind = "number" if final_number(str(first)) == str(first).strip() else "text"
    return ReasoningGymTask(f"rg:{dataset}", GymConfig(dataset, answer=kind))
