"""Test doubles for evaluation tests: a teacher that answers from a script, and a model whose
next-token distribution is the same fixed vector everywhere (so every log-likelihood is a sum
the test can compute by hand)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from lmdistill.teachers.base import (
    Capability,
    Generation,
    GenerationResult,
    Message,
    SamplingParams,
    Teacher,
)


class ScriptedTeacher(Teacher):
    """Answers conversation i, sample j with `respond(messages, j)`."""

    capabilities = Capability.TEXT

    def __init__(self, respond: Callable[[list[Message], int], str], name: str = "scripted"):
        self.respond = respond
        self.name = name
        self.calls = 0

    def iter_generate(
        self, conversations: Sequence[list[Message]], params: SamplingParams
    ) -> Iterator[GenerationResult]:
        self.calls += 1
        for index, messages in reversed(list(enumerate(conversations))):  # any order is allowed
            generations = []
            for sample in range(params.n):
                text = self.respond(messages, sample)
                generations.append(
                    Generation(
                        text=text,
                        finish_reason="stop",
                        prompt_tokens=len(messages[-1]["content"].split()),
                        completion_tokens=len(text.split()),
                        latency_s=0.0,
                    )
                )
            yield GenerationResult(index, generations=generations)


class UnigramModel(Teacher):
    """Every position predicts log_softmax(`logits`), whatever the context."""

    capabilities = Capability.TEXT | Capability.FULL_LOGITS

    def __init__(self, tokenizer, logits: torch.Tensor) -> None:
        self.name = "unigram"
        self.tokenizer = tokenizer
        self.vector = logits.float()
        self.eos_ids = [tokenizer.eos_token_id]
        self.pad_id = tokenizer.pad_token_id
        self.forward_rows: list[int] = []  # rows per forward pass, to see the batching

    def encode_chat(self, messages: list[Message]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.forward_rows.append(input_ids.shape[0])
        return self.vector.expand(*input_ids.shape, -1).clone()

    def log_prob(self, token: int) -> float:
        return float(torch.log_softmax(self.vector.double(), -1)[token])

    def iter_generate(self, conversations, params):  # pragma: no cover - not used
        raise AssertionError("UnigramModel does not generate")
