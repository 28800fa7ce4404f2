"""Log-probabilities a local model gives to given continuations of given contexts: the one
forward-pass helper behind multiple-choice scoring and the teacher-relative metrics.

    model = as_scoring_model(load_teacher("smollm2-135m-instruct"), "multiple choice")
    for batch in plan_batches([len(c) + len(x) for c, x in pairs], token_budget=2048):
        logprobs = continuation_log_probs(model, [contexts[i] for i in batch], ...)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, cast, runtime_checkable

import torch
from torch import Tensor

from lmdistill.errors import UserError
from lmdistill.teachers.base import Capability, Message, Teacher

# Tokens per forward pass (rows x padded length). The (rows, T, V) float32 logits dominate memory:
# 2048 tokens x 49,152 vocabulary x 4 bytes is 400 MB for SmolLM2.
DEFAULT_TOKEN_BUDGET = 2048


@runtime_checkable
class ScoringModel(Protocol):
    """What scoring needs from a model: its chat encoding, tokenizer, end-of-turn ids and full
    next-token logits (`lmdistill.teachers.local.HFTeacher` has all of them)."""

    tokenizer: Any
    eos_ids: list[int]
    pad_id: int

    def encode_chat(self, messages: list[Message]) -> list[int]: ...

    def logits(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor: ...


def as_scoring_model(model: Teacher, purpose: str) -> ScoringModel:
    """`model` as a ScoringModel, or a UserError naming what `purpose` needed."""
    model.require(Capability.FULL_LOGITS, purpose)
    if not isinstance(model, ScoringModel):
        raise UserError(f"model '{model.name}' gives no token-level scores (needed for {purpose})")
    return cast(ScoringModel, model)


def encode_text(model: ScoringModel, text: str) -> list[int]:
    """Token ids of `text` on its own, without special tokens (a continuation after a chat
    prompt, which already ends with the assistant header and a newline)."""
    return list(model.tokenizer(text, add_special_tokens=False)["input_ids"])


def plan_batches(
    lengths: Sequence[int], *, token_budget: int = DEFAULT_TOKEN_BUDGET, max_rows: int = 64
) -> list[list[int]]:
    """Indices of sequences grouped into batches, longest first, each holding at most `max_rows`
    rows and rows x (longest row) <= `token_budget` tokens (a longer sequence gets a batch of its
    own). Sorting by length keeps padding, and so wasted compute, small."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    batches: list[list[int]] = []
    for index in order:
        # Longest first: the first row of a batch is its widest, so its length sets the cost.
        if batches and len(batches[-1]) < max_rows:
            width = lengths[batches[-1][0]]
            if width * (len(batches[-1]) + 1) <= token_budget:
                batches[-1].append(index)
                continue
        batches.append([index])
    return batches


def continuation_log_probs(
    model: ScoringModel, contexts: Sequence[list[int]], continuations: Sequence[list[int]]
) -> list[Tensor]:
    """One forward pass over `context + continuation` for each pair (one batch).

    Returns, per pair, the (C, V) float32 log-softmax of the model's next-token distribution at
    each of the C continuation tokens: row j predicts continuations[i][j]. On the CPU.
    """
    if len(contexts) != len(continuations) or not contexts:
        raise ValueError("need one continuation per context, and at least one pair")
    sequences = [list(c) + list(x) for c, x in zip(contexts, continuations, strict=True)]
    if any(not c for c in contexts):
        raise ValueError("a context must hold at least one token (nothing predicts token 0)")
    width = max(len(s) for s in sequences)
    # Right padding: each row's tokens keep positions 0..L-1, so slicing needs no offset.
    input_ids = torch.full((len(sequences), width), model.pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    logits = model.logits(input_ids, mask)  # (B, T, V); [b, t] predicts token t + 1
    out = []
    for row, (context, continuation) in enumerate(zip(contexts, continuations, strict=True)):
        start = len(context) - 1
        rows = logits[row, start : start + len(continuation)].float()
        out.append(torch.log_softmax(rows, dim=-1).cpu())
    return out


def gather_token_log_probs(log_probs: Tensor, tokens: Sequence[int]) -> Tensor:
    """(C,) log-probs of `tokens` from a (C, V) log-softmax."""
    index = torch.tensor(list(tokens), dtype=torch.long).unsqueeze(1)
    return log_probs.gather(1, index).squeeze(1)
