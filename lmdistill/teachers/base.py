"""The one teacher interface every source implements: a local HF model, an OpenAI-compatible API,
vLLM, or an offline cache of top-k log-probs.

A teacher declares what it can give (`Capability`); a method asks for what it needs with
`teacher.require(...)`, which fails with a clear message when the teacher cannot give it (an API
teacher has no full logits; a cache has no text)."""

from __future__ import annotations

import dataclasses
import enum
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmdistill.data import Message
from lmdistill.errors import UserError


class Capability(enum.Flag):
    TEXT = enum.auto()  # generates responses
    TOPK_LOGPROBS = enum.auto()  # top-k log-probs per position (API logprobs, offline cache)
    FULL_LOGITS = enum.auto()  # the whole (.., V) distribution for given token ids (local model)


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings. temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    n: int = 1
    seed: int | None = None
    top_logprobs: int = 0  # >0: also return this many top log-probs per generated token

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise UserError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.n < 1:
            raise UserError(f"n must be >= 1, got {self.n}")


def sampling_dict(params: SamplingParams) -> dict[str, Any]:
    """The settings that determine a response (what a generated record and its output's
    settings lock store): top_logprobs only when asked for."""
    settings = dataclasses.asdict(params)
    if not settings["top_logprobs"]:
        del settings["top_logprobs"]
    return settings


@dataclass(frozen=True)
class Prices:
    """A teacher's USD per million tokens, for the cost estimate of generation and evaluation."""

    input_per_m: float = 0.0
    output_per_m: float = 0.0

    def __post_init__(self) -> None:
        if self.input_per_m < 0 or self.output_per_m < 0:
            raise UserError("prices must be >= 0 USD per million tokens")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_m + completion_tokens * self.output_per_m) / 1e6


@dataclass
class Generation:
    """One sampled response."""

    text: str
    finish_reason: str  # "stop" (EOS / stop sequence) or "length" (hit max_tokens)
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    # Per generated token: list of (token, logprob) pairs, best first, when asked for and available.
    top_logprobs: list[list[tuple[str, float]]] | None = None
    # Per generated token: (the token itself, its logprob), aligned with `top_logprobs`; the sampled
    # token need not be among the top k, and an OpenAI-style `logprobs` response reports both.
    token_logprobs: list[tuple[str, float]] | None = None
    # The same tokens as ids of the teacher's tokenizer, when the teacher has one (a local model,
    # vLLM; an API names tokens by text only): what an offline top-k cache and the sparse loss
    # index by. top_ids[t][j] is the id of top_logprobs[t][j]; token_ids[t] of token_logprobs[t].
    top_ids: list[list[int]] | None = None
    token_ids: list[int] | None = None


@dataclass
class Failure:
    """A request that could not be completed after the allowed tries. Never dropped silently."""

    reason: str  # short category, e.g. "rate_limited", "server_error", "timeout", "bad_response"
    detail: str = ""
    attempts: int = 0


@dataclass
class GenerationResult:
    index: int  # position of the request in the input sequence
    generations: list[Generation] = field(default_factory=list)  # n of them on success
    failure: Failure | None = None


class Teacher(ABC):
    """A source of teacher signal. Subclasses set `name` and `capabilities`."""

    name: str = "teacher"
    capabilities: Capability = Capability(0)

    def can(self, capability: Capability) -> bool:
        return capability in self.capabilities

    def require(self, capability: Capability, purpose: str) -> None:
        if not self.can(capability):
            have = (
                ", ".join(c.name.lower() for c in Capability if c in self.capabilities) or "nothing"
            )
            raise UserError(
                f"teacher '{self.name}' cannot give {capability.name.lower()} (needed for {purpose}); "
                f"it gives: {have}"
            )

    @abstractmethod
    def iter_generate(
        self, conversations: Sequence[list[Message]], params: SamplingParams
    ) -> Iterator[GenerationResult]:
        """Generate `params.n` responses for each conversation, yielding results as they complete
        (in any order; `GenerationResult.index` says which). Callers persist each result as it
        arrives, so a crash loses at most the requests in flight."""

    def cache_identity(self) -> str | None:
        """What a response cache may key this teacher's answers by: a string that changes whenever
        its answers could (model and endpoint), or None (the default): do not cache its answers.
        A model dir's name alone is not enough (another checkpoint may be saved under it)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections, threads or memory."""
