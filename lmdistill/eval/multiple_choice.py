"""Multiple choice by log-likelihood (MMLU / ARC style): the model answers no question in
words; each option is scored by the log-probability the model gives it as the answer, and the
best-scoring option is the model's choice. No sampling, no answer extraction.

Prompt formats (the chat template wraps the user message; the option is the assistant reply):

  cloze (default)   user:      {question}
                    assistant: {option text}                      <- scored
                    As lm-eval-harness scores ARC and HellaSwag. The options are not shown.

  letters           user:      {question}
                               A. {option 0}
                               B. {option 1} ...
                               Answer with the letter of the correct option.
                    assistant: {letter}                           <- scored
                    MMLU's format (Hendrycks et al. 2021).

Measured on the built-in set with SmolLM2-135M-Instruct: cloze 0.65 (raw), letters 0.21, i.e. at
chance; listing the options and scoring their text did no better (0.29). Small models cannot yet
bind a letter to an option, which is why cloze is the default.

Two accuracies (both as in lm-eval-harness, Gao et al. 2021):
  accuracy        the option with the highest total log-probability (the headline metric);
  accuracy_norm   the highest log-probability per UTF-8 byte of the option, which stops long
                  options from losing merely for having more tokens to pay for. Bytes rather
                  than tokens keep it comparable across models with different tokenizers.

Data: `mc-builtin` is 52 easy general-knowledge questions written for lmdistill (4 options,
answers spread evenly over the positions; `lmdistill/eval/data/mc_builtin.jsonl`).
`mc-jsonl:PATH` reads your own file, one JSON object per line:
  {"question": "...", "choices": ["...", "..."], "answer": 2, "id": "optional"}
where "answer" is the index of the correct choice (0-based), or its exact text, or its letter.
Append `@letters` to either spec for the letters format.
"""

from __future__ import annotations

import string
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmdistill.data.jsonl import iter_jsonl
from lmdistill.errors import InputError, UserError
from lmdistill.eval.base import EvalSettings, Evaluator, TeacherContext
from lmdistill.eval.likelihood import (
    ScoringModel,
    as_scoring_model,
    continuation_log_probs,
    encode_text,
    gather_token_log_probs,
    plan_batches,
)
from lmdistill.eval.results import ModelTaskResult, Score
from lmdistill.store.digest import file_digest
from lmdistill.tasks.base import seeded_subset
from lmdistill.teachers.base import Message, Teacher

Format = Literal["cloze", "letters"]
FORMATS: tuple[Format, ...] = ("cloze", "letters")
BUILTIN_PATH = Path(__file__).parent / "data" / "mc_builtin.jsonl"
LETTERS = string.ascii_uppercase
_LETTERS_INSTRUCTION = "Answer with the letter of the correct option."


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices


def format_messages(question: Question, fmt: Format) -> list[Message]:
    """The prompt (see the module docstring for the formats)."""
    if fmt == "cloze":
        return [{"role": "user", "content": question.question}]
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(question.choices))
    content = f"{question.question}\n{options}\n{_LETTERS_INSTRUCTION}"
    return [{"role": "user", "content": content}]


def continuations(question: Question, fmt: Format) -> list[str]:
    """The text scored for each option."""
    if fmt == "cloze":
        return list(question.choices)
    return [LETTERS[i] for i in range(len(question.choices))]


def choose(log_probs: list[float], texts: list[str]) -> tuple[int, int]:
    """(raw choice, length-normalised choice): the argmax of the total log-probability, and of
    the log-probability per UTF-8 byte of the option text. Ties go to the earlier option."""
    raw = max(range(len(log_probs)), key=lambda i: log_probs[i])
    per_byte = [lp / max(1, len(t.encode("utf-8"))) for lp, t in zip(log_probs, texts, strict=True)]
    norm = max(range(len(per_byte)), key=lambda i: per_byte[i])
    return raw, norm


def load_questions(path: Path) -> list[Question]:
    """Parse and check a multiple-choice JSONL file (format in the module docstring)."""
    if not path.is_file():
        raise UserError(f"multiple-choice file not found: {path}")
    questions: list[Question] = []
    seen: dict[str, int] = {}
    for number, record in iter_jsonl(path):
        question = _parse_question(path, number, record)
        if question.id in seen:
            raise InputError(path, f"duplicate id (first on line {seen[question.id]})", line=number)
        seen[question.id] = number
        questions.append(question)
    if not questions:
        raise InputError(path, "no questions (expected one JSON object per line)")
    return questions


def _parse_question(path: Path, number: int, record: dict[str, Any]) -> Question:
    def fail(message: str, field: str | None = None) -> InputError:
        return InputError(path, message, line=number, field=field)

    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise fail("must be a non-empty string", "question")
    choices = record.get("choices")
    if (
        not isinstance(choices, list)
        or not 2 <= len(choices) <= len(LETTERS)
        or not all(isinstance(c, str) and c.strip() for c in choices)
    ):
        raise fail(f"must be a list of 2 to {len(LETTERS)} non-empty strings", "choices")
    if len(set(choices)) != len(choices):
        raise fail("choices must differ from each other", "choices")
    answer = _answer_index(record.get("answer"), choices)
    if answer is None:
        raise fail(
            "must be the index of the correct choice (0-based), its exact text, or its letter",
            "answer",
        )
    example_id = record.get("id", f"{path.stem}/{number}")
    if isinstance(example_id, bool) or not isinstance(example_id, str | int):
        raise fail("must be a string or an integer", "id")
    return Question(str(example_id), question, tuple(choices), answer)


def _answer_index(answer: Any, choices: list[str]) -> int | None:
    if isinstance(answer, int) and not isinstance(answer, bool):
        return answer if 0 <= answer < len(choices) else None
    if isinstance(answer, str):
        if answer in choices:
            return choices.index(answer)
        letter = answer.strip().upper()
        if len(letter) == 1 and letter in LETTERS[: len(choices)]:
            return LETTERS.index(letter)
    return None


def split_format(spec: str) -> tuple[str, Format]:
    """ "PATH@letters" -> ("PATH", "letters"); only a known format after the last @ counts."""
    head, at, tail = spec.rpartition("@")
    if at and tail in FORMATS:
        return head, tail  # type: ignore[return-value]
    return spec, "cloze"


def option_log_probs(
    model: ScoringModel, questions: list[Question], fmt: Format, token_budget: int
) -> list[list[float]]:
    """Per question, the total log-probability of each option's continuation."""
    contexts, conts, owners = [], [], []
    for q_index, question in enumerate(questions):
        context = model.encode_chat(format_messages(question, fmt))
        for text in continuations(question, fmt):
            contexts.append(context)
            conts.append(encode_text(model, text))
            owners.append(q_index)
    totals = [0.0] * len(conts)
    lengths = [len(c) + len(x) for c, x in zip(contexts, conts, strict=True)]
    for batch in plan_batches(lengths, token_budget=token_budget):
        log_probs = continuation_log_probs(
            model, [contexts[i] for i in batch], [conts[i] for i in batch]
        )
        for i, lp in zip(batch, log_probs, strict=True):
            totals[i] = float(gather_token_log_probs(lp, conts[i]).double().sum())
    out: list[list[float]] = [[] for _ in questions]
    for owner, total in zip(owners, totals, strict=True):
        out[owner].append(total)
    return out


class MultipleChoiceEval(Evaluator):
    """Multiple choice by log-likelihood (see the module docstring)."""

    kind = "multiple_choice"
    primary = "accuracy"

    def __init__(self, spec: str, path: Path, fmt: Format, *, token_budget: int = 2048) -> None:
        self.name = spec
        self.path = path
        self.format = fmt
        self.token_budget = token_budget
        self.questions = load_questions(path)
        self.description = f"multiple choice by log-likelihood, {fmt} format"

    def identity(self) -> dict[str, Any]:
        return {**super().identity(), "data": file_digest(self.path), "format": self.format}

    def run(
        self, model: Teacher, settings: EvalSettings, *, teacher: TeacherContext | None = None
    ) -> ModelTaskResult:
        started = time.perf_counter()
        scorer = as_scoring_model(model, "multiple-choice scoring")
        questions = seeded_subset(self.questions, settings.limit, settings.seed)
        all_log_probs = option_log_probs(scorer, questions, self.format, self.token_budget)
        raw_correct, norm_correct, records = [], [], []
        for question, log_probs in zip(questions, all_log_probs, strict=True):
            raw, norm = choose(log_probs, continuations(question, self.format))
            raw_correct.append(float(raw == question.answer))
            norm_correct.append(float(norm == question.answer))
            records.append(
                {
                    "id": question.id,
                    "question": question.question,
                    "answer": question.answer,
                    "choice": raw,
                    "choice_norm": norm,
                    "log_probs": log_probs,
                }
            )
        stat = {"confidence": settings.confidence, "seed": settings.seed}
        return ModelTaskResult(
            task=self.name,
            model=model.name,
            primary=self.primary,
            metrics={
                "accuracy": Score.of_mean(raw_correct, **stat),
                "accuracy_norm": Score.of_mean(norm_correct, **stat),
            },
            example_ids=[q.id for q in questions],
            per_example=raw_correct,
            records=records,
            details={"chance": sum(1 / len(q.choices) for q in questions) / len(questions)},
            seconds=time.perf_counter() - started,
        )
