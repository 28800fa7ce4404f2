"""Reasoning distillation: prompts that ask for step-by-step work ending in a marked answer, and a
verification filter that keeps only the traces the task's own scorer accepts (rejection sampling,
as in STaR, Zelikman et al. 2022, and RFT, Yuan et al. 2023).

    prompts = task_prompts(get_task("gsm_symbolic"), limit=500, template="step_by_step")
    # write them as JSONL, then: lmdistill generate ... --n 4 --temperature 0.8 --out traces.jsonl
    stats = filter_file("traces.jsonl", "kept.jsonl", get_task("gsm_symbolic"), keep="best")

The filter scores each sample with `Task.score` (STYLE.md principle 8: the verifier that grades the
benchmark is the one that filters the traces), so a prompt record must carry what the scorer needs:
`task_prompts` writes the example's `reference` and `metadata`, which `generate` copies into every
output record, and the filter rebuilds the `Example` from them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmdistill.data import Message
from lmdistill.data.jsonl import describe, iter_jsonl, write_json_atomic, write_jsonl_atomic
from lmdistill.errors import InputError, UserError
from lmdistill.tasks.base import Example, Split, Task
from lmdistill.tasks.extract import marked_answer_start

Keep = Literal["best", "all"]
# (Example, response) -> score; by default the task's own `score`.
Scorer = Callable[[Example, str], float]


# ----------------------------------------------------------------------------------- templates
@dataclass(frozen=True)
class Template:
    """How to ask for reasoning: an instruction appended to the last user message and/or a
    system message. Every template asks for the final answer as 'Answer: X' on its own last line,
    which `tasks.extract.marked_answer` reads and `marked_answer_start` locates."""

    instruction: str | None = None
    system: str | None = None
    description: str = ""


TEMPLATES: dict[str, Template] = {
    "step_by_step": Template(
        instruction=(
            "Think step by step. Then write the final answer on its own last line in the form "
            "'Answer: <answer>'."
        ),
        description="chain of thought (Wei et al. 2022) ending in a marked answer",
    ),
    "concise": Template(
        instruction=(
            "Work it out in one short line, then write the final answer on its own last line in "
            "the form 'Answer: <answer>'."
        ),
        description="a short working line, then the marked answer (small models, short budgets)",
    ),
    "system": Template(
        system=(
            "You are a careful problem solver. Reason step by step, then end with the final "
            "answer on its own last line in the form 'Answer: <answer>'."
        ),
        description="the step-by-step instruction as a system message; the question unchanged",
    ),
}


def template(name: str) -> Template:
    """The template called `name`, or a UserError listing the names."""
    if name not in TEMPLATES:
        raise UserError(
            f"unknown reasoning template '{name}'; choose one of: {', '.join(TEMPLATES)}"
        )
    return TEMPLATES[name]


def apply_template(messages: Sequence[Message], name: str) -> list[Message]:
    """A new message list asking for reasoning with template `name`: its instruction appended
    to the last user message (after a blank line), its system message prepended unless the
    conversation has one. `messages` and its dicts are not modified."""
    chosen = template(name)
    out = [dict(m) for m in messages]
    if chosen.instruction is not None:
        users = [i for i, m in enumerate(out) if m.get("role") == "user"]
        if not users or not isinstance(out[users[-1]].get("content"), str):
            raise UserError(f"template '{name}' needs a user message with text content")
        last = out[users[-1]]
        last["content"] = f"{last['content'].rstrip()}\n\n{chosen.instruction}"
    if chosen.system is not None and not (out and out[0].get("role") == "system"):
        out.insert(0, {"role": "system", "content": chosen.system})
    return out


def ask(example: Example, template: str | None) -> list[Message]:
    """The messages that put `example` to a model with reasoning template `template` (None: the
    task's own prompt, unchanged). A single-message example that keeps its bare question in
    `metadata["question"]` (the reasoning-gym tasks) is re-asked from that question, so the
    template's instruction replaces the task's own instead of being added to it."""
    if template is None:
        return example.messages
    messages = example.messages
    question = example.metadata.get("question")
    if isinstance(question, str) and len(messages) == 1:
        messages = [{"role": "user", "content": question}]
    return apply_template(messages, template)


def task_prompts(
    task: Task,
    *,
    split: Split = "train",
    limit: int | None = None,
    seed: int = 0,
    template: str | None = None,
) -> list[dict[str, Any]]:
    """Prompt records for `lmdistill.pipelines.generate`: {id, messages, reference, metadata,
    split}, one per example of `task` (`Task.examples(split, limit, seed)`).

    template: a name in TEMPLATES, or None for the task's own prompt; the messages are `ask`'s.
    With a template the record also keeps the task's own prompt as `task_messages`, so the
    `Example` the filter rebuilds is the task's, whatever was sent."""
    records = []
    for example in task.examples(split=split, limit=limit, seed=seed):
        record: dict[str, Any] = {
            "id": example.id,
            "messages": ask(example, template),
            "reference": example.reference,
            "metadata": example.metadata,
            "split": split,
        }
        if template is not None:
            record["task_messages"] = example.messages
        records.append(record)
    return records


# --------------------------------------------------------------------------------- the filter
@dataclass
class FilterStats:
    """What the filter saw and kept. A sample is *accepted* when its score reaches min_score
    (every sample when min_score is None); duplicates count as samples but are never kept twice."""

    keep: str
    min_score: float | None
    prompts: int = 0
    samples: int = 0
    accepted: int = 0  # samples whose score reaches min_score
    accepted_prompts: int = 0  # prompts with at least one accepted sample
    duplicates: int = 0  # samples dropped as repeats of an earlier response to the same prompt
    kept: int = 0  # records written
    # Samples per score bin: "[0.0, 0.1)" ... "[0.9, 1.0)", and "1.0" for full marks (scores
    # outside [0, 1], from a reward function, fall into the end bins).
    histogram: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_BIN_LABELS, 0))

    @property
    def sample_acceptance(self) -> float:
        return self.accepted / self.samples if self.samples else 0.0

    @property
    def prompt_acceptance(self) -> float:
        return self.accepted_prompts / self.prompts if self.prompts else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "sample_acceptance": self.sample_acceptance,
            "prompt_acceptance": self.prompt_acceptance,
        }

    def report(self) -> str:
        """One line for the terminal."""
        return (
            f"kept {self.kept} of {self.samples} samples ({self.prompts} prompts): "
            f"{self.sample_acceptance:.1%} of samples and {self.prompt_acceptance:.1%} of prompts "
            f"accepted, {self.duplicates} duplicates"
        )


_BIN_LABELS = [f"[{i / 10:.1f}, {(i + 1) / 10:.1f})" for i in range(10)] + ["1.0"]


def _bin(score: float) -> str:
    if score >= 1.0:
        return "1.0"
    return _BIN_LABELS[min(max(int(score * 10), 0), 9)]


# A record's problem as (field, message), raised by the caller as an InputError (file:line) or a
# UserError (record index).
Problem = Callable[[str | None, str], UserError]


def filter_traces(
    records: Iterable[dict[str, Any]],
    task: Task,
    *,
    keep: Keep = "best",
    min_score: float | None = 1.0,
    dedupe: bool = True,
    scorer: Scorer | None = None,
) -> tuple[list[dict[str, Any]], FilterStats]:
    """Verify sampled traces and keep the good ones.

    records: `generate` output, several samples per `id` for rejection sampling; each needs
    `id`, `messages`, `response`, and what the task's scorer reads (`reference`, `metadata`, as
    `task_prompts` writes them). keep: "best" keeps each prompt's highest-scoring sample (the
    first among equals) when it reaches `min_score`; "all" keeps every sample that does.
    min_score None accepts every sample (for "best": the best one whatever its score). dedupe:
    a response repeating an earlier one to the same prompt (after normalising whitespace) is
    dropped. scorer: (example, response) -> score, by default `task.score`.

    Returns new records (the inputs are not modified), grouped by prompt in first-seen order,
    each with `score` and `answer_start` (the character offset in `response` where the marked
    final answer begins, None when it marks none), and the statistics. Raises UserError naming
    the record index and field of a record the scorer cannot read."""

    def problem(index: int) -> Problem:
        def make(field: str | None, message: str) -> UserError:
            where = f"field '{field}': " if field else ""
            return UserError(f"record {index}: {where}{message}")

        return make

    return _filter(
        [(r, problem(i)) for i, r in enumerate(records)],
        task,
        keep=keep,
        min_score=min_score,
        dedupe=dedupe,
        scorer=scorer,
    )


def filter_file(
    in_path: str | Path,
    out_path: str | Path,
    task: Task,
    *,
    keep: Keep = "best",
    min_score: float | None = 1.0,
    dedupe: bool = True,
    scorer: Scorer | None = None,
) -> FilterStats:
    """`filter_traces` over a JSONL file of `generate` output. Writes the kept records to
    `out_path` (a temp file renamed into place, so a crash never leaves half a file) and the
    statistics to `out_path.with_suffix(".stats.json")`. A bad line is an InputError naming
    file:line and field."""
    in_path, out_path = Path(in_path), Path(out_path)
    if in_path.resolve() == out_path.resolve():
        raise UserError(f"{out_path}: the filter's output must not be its input")

    def problem(line: int) -> Problem:
        return lambda field, message: InputError(in_path, message, line=line, field=field)

    entries = [(record, problem(line)) for line, record in iter_jsonl(in_path)]
    if not entries:
        raise InputError(in_path, "has no records to filter")
    kept, stats = _filter(
        entries, task, keep=keep, min_score=min_score, dedupe=dedupe, scorer=scorer
    )
    write_jsonl_atomic(out_path, kept)
    write_json_atomic(out_path.with_suffix(".stats.json"), stats.to_dict())
    return stats


def _filter(
    entries: list[tuple[dict[str, Any], Problem]],
    task: Task,
    *,
    keep: Keep,
    min_score: float | None,
    dedupe: bool,
    scorer: Scorer | None,
) -> tuple[list[dict[str, Any]], FilterStats]:
    if keep not in ("best", "all"):
        raise UserError(f"keep must be 'best' or 'all', got {keep!r}")
    score_fn = scorer or task.score
    stats = FilterStats(keep=keep, min_score=min_score)
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    seen: dict[str, set[str]] = {}
    for record, problem in entries:
        example, response = _example(record, problem)
        stats.samples += 1
        candidates = by_prompt.setdefault(example.id, [])
        responses_seen = seen.setdefault(example.id, set())
        key = " ".join(response.split())
        if dedupe and key in responses_seen:
            # Scored anyway: the acceptance rate is a property of the sampler, repeats included.
            duplicate = True
        else:
            duplicate = False
            responses_seen.add(key)
        try:
            score = float(score_fn(example, response))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise problem(
                None,
                f"task '{task.name}' cannot score this record ({type(exc).__name__}: {exc}); "
                "records need the example's reference and metadata, as task_prompts writes them",
            ) from None
        stats.histogram[_bin(score)] += 1
        accepted = min_score is None or score >= min_score
        stats.accepted += accepted
        if duplicate:
            stats.duplicates += 1
            continue
        if accepted:
            kept = dict(record)
            kept["score"] = score
            kept["answer_start"] = marked_answer_start(response)
            candidates.append(kept)
    stats.prompts = len(by_prompt)
    out: list[dict[str, Any]] = []
    for candidates in by_prompt.values():
        if not candidates:
            continue
        stats.accepted_prompts += 1
        if keep == "best":
            # max() returns the first of equal maxima: ties go to the earliest sample.
            out.append(max(candidates, key=lambda r: r["score"]))
        else:
            out.extend(candidates)
    stats.kept = len(out)
    return out, stats


def _example(record: dict[str, Any], problem: Problem) -> tuple[Example, str]:
    """The task Example a generated record answers (its prompt as the task wrote it), and the
    response."""
    prompt_id = record.get("id")
    if isinstance(prompt_id, bool) or not isinstance(prompt_id, str | int) or prompt_id == "":
        raise problem("id", f"must be a non-empty string or integer, got {describe(prompt_id)}")
    response = record.get("response")
    if not isinstance(response, str):
        raise problem("response", f"must be a string, got {describe(response)}")
    name = "task_messages" if "task_messages" in record else "messages"
    messages = record.get(name)
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise problem(name, f"must be a list of {{role, content}}, got {describe(messages)}")
    metadata = record.get("metadata", {})
    if not isinstance(metadata, dict):
        raise problem("metadata", f"must be an object, got {describe(metadata)}")
    example = Example(
        id=str(prompt_id), messages=messages, reference=record.get("reference"), metadata=metadata
    )
    return example, response
