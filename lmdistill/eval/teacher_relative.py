"""Teacher-relative metrics: how close the student stays to its teacher on held-out prompts
(the instruction-following protocol of MiniLLM, Gu et al. 2024, and DistiLLM, Ko et al. 2024).

For each held-out prompt the teacher writes a greedy response. Then, for the student, on the
teacher's response tokens (teacher forcing, every token counted once):

  kl              KL(teacher || student) per token: sum_v p_t(v) (log p_t(v) - log p_s(v)),
                  summed over response tokens and divided by their count (lower is better);
  top1_agreement  the share of response positions where both models' most likely next token is
                  the same (higher is better);
  perplexity      exp of the student's mean negative log-likelihood of the teacher's tokens
                  (lower is better);

and, from the student's own greedy response to the same prompt:

  rouge_l         ROUGE-L F1 (Lin 2004, `rouge.py`) against the reference response: the JSONL
                  file's `response` when it has one, else the teacher's (headline metric).

KL and agreement compare distributions over one vocabulary, so they need teacher and student to
share a tokenizer (as a student initialised from, or built for, its teacher does); otherwise
they are left out and perplexity is the student's on its own tokenization of the text. The
response's end-of-turn token counts as a response token when the response ended there: ending
on time is part of what a student should learn.

Intervals: per-token metrics are ratios (sum over examples / token count), so their intervals
come from a bootstrap over examples of that ratio; ROUGE-L from a bootstrap of its mean.

Prompt sets:
  rel             the held-out ("test") prompts of lmdistill's bundled prompt set
                  (lmdistill/assets/prompts.jsonl), which the quickstart never trains on;
  rel:TASK        the test prompts of any task (`rel:gsm_symbolic`, `rel:jsonl:qa.jsonl`);
  rel-jsonl:PATH  your file: one object per line with "prompt" (text) or "messages" (chat),
                  optional "id", optional "response" (the reference), optional "split" (when
                  any line has one, only "test" lines are used).
  ref-jsonl:PATH  such a file where every line has its "response" (e.g. a text-only teacher's
                  answers, which `lmdistill run` writes to held_out.jsonl): each model is
                  compared with those responses alone, no teacher model needed: ROUGE-L against
                  them and the perplexity of their tokens (no KL or agreement: those need the
                  teacher's distribution, which an API does not give).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmdistill.data.jsonl import chat_messages, iter_jsonl
from lmdistill.errors import InputError, UserError
from lmdistill.eval.base import EvalSettings, Evaluator, ScoreMemo, TeacherContext
from lmdistill.eval.generation import GenerationEval, generate_responses
from lmdistill.eval.likelihood import (
    DEFAULT_TOKEN_BUDGET,
    ScoringModel,
    as_scoring_model,
    continuation_log_probs,
    encode_text,
    gather_token_log_probs,
    plan_batches,
)
from lmdistill.eval.results import ModelTaskResult, Score
from lmdistill.eval.rouge import rouge_l
from lmdistill.eval.stats import bootstrap_mean_interval, retention_interval
from lmdistill.losses.divergences import soft_term
from lmdistill.store.digest import file_digest
from lmdistill.tasks.base import Task, seeded_subset
from lmdistill.teachers.base import Capability, Generation, GenerationResult, Message, Teacher
from lmdistill.teachers.bundled import BUNDLED_NAMES

BUNDLED_PROMPTS = Path(__file__).parent.parent / "assets" / "prompts.jsonl"
_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class HeldOutPrompt:
    id: str
    messages: list[Message]
    reference: str | None = None  # a reference response; None: the teacher's response is one
    made: Generation | None = None  # the reference as `made_by` wrote it (`lmdistill generate`)
    made_by: str | None = None  # the teacher spec a generate record names
    made_greedy_tokens: int | None = None  # its max_tokens, when it was decoded greedily


@dataclass
class TokenStats:
    """Sums over one response's tokens (float64 for accumulation)."""

    kl: float = 0.0
    agree: float = 0.0
    nll: float = 0.0
    tokens: int = 0


def kl_per_position(
    teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor
) -> torch.Tensor:
    """KL(teacher || student) at each position: (C, V) log-softmax inputs -> (C,).

    The training losses' own forward KL (`lmdistill.losses.divergences.soft_term`), so the
    number reported is the quantity a forward-KL student was trained to lower."""
    return soft_term(student_log_probs, teacher_log_probs, "forward_kl")


def read_prompt_file(path: Path) -> list[HeldOutPrompt]:
    """Prompts (and optional references) from a JSONL file; see the module docstring."""
    if not path.is_file():
        raise UserError(f"prompt file not found: {path}")
    rows: list[tuple[HeldOutPrompt, str | None]] = []
    seen: set[str] = set()
    for number, record in iter_jsonl(path):
        prompt, split = _parse_prompt(path, number, record)
        if prompt.id in seen:
            raise InputError(path, f"duplicate id {prompt.id!r}", line=number, field="id")
        seen.add(prompt.id)
        rows.append((prompt, split))
    if any(split is not None for _, split in rows):
        rows = [row for row in rows if row[1] == "test"]
    if not rows:
        raise InputError(path, "no (test) prompts: expected one JSON object per line")
    return [prompt for prompt, _ in rows]


def _parse_prompt(
    path: Path, number: int, record: dict[str, Any]
) -> tuple[HeldOutPrompt, str | None]:
    def fail(message: str, field: str | None = None) -> InputError:
        return InputError(path, message, line=number, field=field)

    messages: list[Message] = chat_messages(
        path, number, record, roles=_ROLES, prompt_only=True, text_only=True
    )
    reference = record.get("response")
    if reference is not None and not isinstance(reference, str):
        raise fail("must be a string", "response")
    split = record.get("split")
    if split is not None and split not in ("train", "test"):
        raise fail(f"must be 'train' or 'test', got {split!r}", "split")
    example_id = record.get("id", f"{path.stem}/{number}")
    if isinstance(example_id, bool) or not isinstance(example_id, str | int):
        raise fail("must be a string or an integer", "id")
    prompt = HeldOutPrompt(str(example_id), messages, reference, *_provenance(record))
    return prompt, split


def _provenance(record: dict[str, Any]) -> tuple[Generation | None, str | None, int | None]:
    """A `lmdistill generate` record's response as a Generation, the teacher that wrote it, and
    its max_tokens when decoding was greedy; Nones for a record without those fields."""
    sampling, usage = record.get("sampling"), record.get("usage")
    teacher, finish = record.get("teacher"), record.get("finish_reason")
    response = record.get("response")
    if not (
        isinstance(sampling, dict)
        and isinstance(usage, dict)
        and isinstance(teacher, str)
        and finish in ("stop", "length")
        and isinstance(response, str)
    ):
        return None, None, None
    greedy = sampling.get("temperature") == 0 and isinstance(sampling.get("max_tokens"), int)
    made = Generation(
        response,
        finish,
        int(usage.get("prompt_tokens") or 0),
        int(usage.get("completion_tokens") or 0),
        float(record.get("latency_s") or 0.0),
    )
    return made, teacher, sampling["max_tokens"] if greedy else None


def prompts_from_task(task: Task, limit: int | None, seed: int) -> list[HeldOutPrompt]:
    return [
        HeldOutPrompt(e.id, e.messages) for e in task.examples(split="test", limit=limit, seed=seed)
    ]


def same_vocabulary(a: ScoringModel, b: ScoringModel) -> bool:
    return a is b or a.tokenizer.get_vocab() == b.tokenizer.get_vocab()


def response_tokens(model: ScoringModel, text: str, *, ended: bool) -> list[int]:
    """`text` as `model`'s tokens, with its end-of-turn token when the response ended there."""
    return encode_text(model, text) + ([model.eos_ids[0]] if ended else [])


def token_stats(
    teacher: ScoringModel,
    student: ScoringModel,
    prompts: list[list[Message]],
    responses: list[str],
    ended: list[bool],
    *,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    compare: bool = True,
    memo: ScoreMemo | None = None,
) -> tuple[list[TokenStats], bool]:
    """Per response, the sums behind kl, top1_agreement and perplexity (see the module
    docstring), and whether KL and agreement were computed (a shared vocabulary; never with
    compare=False, when there is no teacher distribution to compare with). `memo` keeps the
    teacher's log-probs of each batch for the next student (keyed by the batch's tokens, so a
    hit is the same forward pass)."""
    shared = compare and same_vocabulary(teacher, student)
    teacher_ctx = [teacher.encode_chat(p) for p in prompts]
    student_ctx = teacher_ctx if student is teacher else [student.encode_chat(p) for p in prompts]
    # With a shared vocabulary both models read the teacher's tokens of the response, so their
    # distributions line up position by position.
    teacher_resp = [
        response_tokens(teacher, r, ended=e) for r, e in zip(responses, ended, strict=True)
    ]
    student_resp = (
        teacher_resp
        if shared
        else [response_tokens(student, r, ended=e) for r, e in zip(responses, ended, strict=True)]
    )
    lengths = [
        max(len(tc) + len(tr), len(sc) + len(sr))
        for tc, tr, sc, sr in zip(teacher_ctx, teacher_resp, student_ctx, student_resp, strict=True)
    ]
    stats = [TokenStats() for _ in prompts]
    for batch in plan_batches(lengths, token_budget=token_budget):
        s_lp = continuation_log_probs(
            student, [student_ctx[i] for i in batch], [student_resp[i] for i in batch]
        )
        if shared and student is not teacher:
            contexts = [teacher_ctx[i] for i in batch]
            continuations = [teacher_resp[i] for i in batch]
            key = tuple((tuple(c), tuple(r)) for c, r in zip(contexts, continuations, strict=True))
            t_lp = memo.get(key) if memo is not None else None
            if t_lp is None:
                t_lp = continuation_log_probs(teacher, contexts, continuations)
                if memo is not None:
                    memo.put(key, t_lp)
        else:
            t_lp = s_lp  # the teacher scored against itself: one forward pass serves both
        for i, s, t in zip(batch, s_lp, t_lp, strict=True):
            stat = stats[i]
            stat.tokens = len(student_resp[i])
            stat.nll = -float(gather_token_log_probs(s, student_resp[i]).double().sum())
            if shared:
                stat.kl = float(kl_per_position(t, s).sum())
                stat.agree = float((t.argmax(-1) == s.argmax(-1)).double().sum())
    return stats, shared


def ratio_score(
    numerators: list[float], denominators: list[float], settings: EvalSettings
) -> Score:
    """sum(numerators) / sum(denominators) with a paired bootstrap over examples.

    `retention_interval` computes mean(a) / mean(b) over resampled examples, which is exactly
    sum(a) / sum(b): the token-weighted ratio, so one long response counts for its length."""
    interval = retention_interval(
        numerators, denominators, confidence=settings.confidence, seed=settings.seed
    )
    return Score.of_interval(interval, len(numerators), "ratio-bootstrap")


class TeacherRelativeEval(Evaluator):
    """Teacher-relative metrics (see the module docstring)."""

    kind = "teacher_relative"
    primary = "rouge_l"
    needs_teacher = True

    def __init__(
        self,
        spec: str,
        *,
        task: Task | None = None,
        path: Path | None = None,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        references: bool = False,
    ) -> None:
        if (task is None) == (path is None) or (references and path is None):
            raise ValueError("give exactly one of task or path (references: a path)")
        self.name = spec
        self.task = task
        self.path = path
        self.token_budget = token_budget
        self._file_prompts = read_prompt_file(path) if path is not None else None
        # The file's responses stand in for the teacher's: no teacher model takes part.
        self.references = references
        self.needs_teacher = not references
        self.description = "KL, top-1 agreement, perplexity on teacher responses; ROUGE-L"
        if references:
            unanswered = [p.id for p in self._file_prompts or [] if p.reference is None]
            if unanswered:
                raise UserError(
                    f"{path}: prompt(s) {unanswered[:3]} have no 'response' to compare with"
                )
            self.description = "ROUGE-L against the file's responses, perplexity of their tokens"

    def identity(self) -> dict[str, Any]:
        identity = super().identity()
        if self.path is not None:
            identity["data"] = file_digest(self.path)
        if self.task is not None:  # the prompts' source: a JSONL task's content, a package version
            identity["prompts"] = GenerationEval(self.name, self.task).identity()
        return identity

    def prompts(self, settings: EvalSettings) -> list[HeldOutPrompt]:
        if self._file_prompts is not None:
            return seeded_subset(self._file_prompts, settings.limit, settings.seed)
        assert self.task is not None
        return prompts_from_task(self.task, settings.limit, settings.seed)

    def run(
        self, model: Teacher, settings: EvalSettings, *, teacher: TeacherContext | None = None
    ) -> ModelTaskResult:
        started = time.perf_counter()
        # Against the file's responses a text-only model (an API teacher) still gets ROUGE-L;
        # the perplexity of their tokens needs its token scores.
        scored = not self.references or model.can(Capability.FULL_LOGITS)
        scorer = as_scoring_model(model, "teacher-relative metrics") if scored else None
        prompts = self.prompts(settings)
        results = self._already_made(prompts, model, settings) if teacher is None else None
        reused = results is not None
        if results is None:
            results = generate_responses(
                model, [p.messages for p in prompts], settings.sampling(greedy=True)
            )
        own = [r.generations[0] if r.generations else None for r in results]
        own_text = [g.text if g else "" for g in own]
        if self.references:  # the file's responses are followed, by every model
            followed = [p.reference or "" for p in prompts]
            # A response `lmdistill generate` cut at max_tokens did not end there.
            ended = [p.made is None or p.made.finish_reason == "stop" for p in prompts]
            teacher_scorer = scorer
        elif teacher is None:  # this is the teacher: its responses are the ones to follow
            teacher_scorer = scorer
            followed = own_text
            ended = [g is not None and g.finish_reason == "stop" for g in own]
        else:
            by_id = {r["id"]: r for r in teacher.result.records}
            missing = [p.id for p in prompts if p.id not in by_id]
            if missing:
                raise UserError(f"task '{self.name}': the teacher's result lacks {missing[:3]}")
            followed = [by_id[p.id]["response"] for p in prompts]
            ended = [by_id[p.id]["ended"] for p in prompts]
            teacher_scorer = as_scoring_model(teacher.load(), "teacher-relative metrics")
        references = [
            p.reference if p.reference is not None else f
            for p, f in zip(prompts, followed, strict=True)
        ]

        stats, shared = [TokenStats() for _ in prompts], False
        if scorer is not None:
            stats, shared = token_stats(
                teacher_scorer,
                scorer,
                [p.messages for p in prompts],
                followed,
                ended,
                token_budget=self.token_budget,
                compare=not self.references,
                memo=teacher.memo if teacher is not None else None,
            )
        rouge = [rouge_l(o, ref).f for o, ref in zip(own_text, references, strict=True)]
        metrics = self._metrics(stats, rouge, shared, settings, scored=scorer is not None)
        records = [
            {
                "id": p.id,
                "prompt": p.messages[-1]["content"],
                "response": text,
                "ended": g is not None and g.finish_reason == "stop",
                "reference": ref,
                "rouge_l": r,
                "tokens": s.tokens,
                "kl": s.kl if shared else None,  # sums over the tokens, as are agree and nll
                "agree": s.agree if shared else None,
                "nll": s.nll if scorer is not None else None,
            }
            for p, text, g, ref, r, s in zip(
                prompts, own_text, own, references, rouge, stats, strict=True
            )
        ]
        return ModelTaskResult(
            task=self.name,
            model=model.name,
            primary=self.primary,
            metrics=metrics,
            example_ids=[p.id for p in prompts],
            per_example=rouge,
            records=records,
            details={
                "response_tokens": sum(s.tokens for s in stats),
                "shared_vocabulary": shared,
                "reference": "file"
                if self.path is not None and any(p.reference for p in prompts)
                else "teacher",
                "failed_requests": sum(r.failure is not None for r in results),
                **({"responses": "the file's (this model's greedy ones)"} if reused else {}),
            },
            prompt_tokens=sum(g.prompt_tokens for g in own if g),
            completion_tokens=sum(g.completion_tokens for g in own if g),
            seconds=time.perf_counter() - started,
        )

    @staticmethod
    def _already_made(
        prompts: list[HeldOutPrompt], model: Teacher, settings: EvalSettings
    ) -> list[GenerationResult] | None:
        """The file's responses as this model's own, when every one was written by this model
        (the spec `lmdistill generate` recorded), greedily, with this eval's max_tokens: greedy
        decoding would write them again, so they are not generated twice (the quickstart's
        held-out file is the teacher's). Only for a name that identifies the weights (a bundled
        teacher, an API model): a model dir's name does not. None otherwise."""
        if model.name not in BUNDLED_NAMES and model.cache_identity() is None:
            return None
        if not all(
            p.made is not None
            and p.made_by == model.name
            and p.made_greedy_tokens == settings.max_tokens
            for p in prompts
        ):
            return None
        return [GenerationResult(i, [p.made]) for i, p in enumerate(prompts) if p.made is not None]

    @staticmethod
    def _metrics(
        stats: list[TokenStats],
        rouge: list[float],
        shared: bool,
        settings: EvalSettings,
        *,
        scored: bool = True,
    ) -> dict[str, Score]:
        metrics: dict[str, Score] = {
            "rouge_l": Score.of_interval(
                bootstrap_mean_interval(rouge, confidence=settings.confidence, seed=settings.seed),
                len(rouge),
                "bootstrap",
            )
        }
        if not scored:  # a text-only model: its ROUGE-L alone
            return metrics
        counted = [s for s in stats if s.tokens > 0]
        if not counted:
            raise UserError("every teacher response is empty: nothing to compare")
        tokens = [float(s.tokens) for s in counted]
        if shared:
            metrics["kl"] = ratio_score([s.kl for s in counted], tokens, settings)
            metrics["top1_agreement"] = ratio_score([s.agree for s in counted], tokens, settings)
        nll = ratio_score([s.nll for s in counted], tokens, settings)
        # exp is increasing, so the bounds of the mean NLL map to bounds of the perplexity.
        metrics["perplexity"] = Score(
            math.exp(nll.value), math.exp(nll.low), math.exp(nll.high), nll.n, nll.method
        )
        return metrics
