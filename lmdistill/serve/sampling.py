"""Per-request decoding for the server's engine: one request's settings (`SamplingOptions`), the
logits processing and token choice for one row, and stop-string handling on the decoded text.

The settings and their order follow vLLM's sampler, so a client moving between `vllm serve` and
`lmdistill serve` gets the same distribution: logit bias, allowed tokens and min_tokens first, then
the repetition / presence / frequency penalties, then temperature, top-k, top-p and min-p. The
log-probs a response reports are the model's own (temperature 1, before any processing), as vLLM
reports them by default and as distillation wants them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmdistill.teachers.sampling import top_p_filter

# vLLM treats a temperature below this as greedy: dividing logits by ~1e-40 overflows to inf/nan.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingOptions:
    """How one request decodes; n choices share it. `logprobs` / `prompt_logprobs`: None for none,
    k >= 0 for the chosen token's log-prob plus the k most likely ones."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1, as vLLM spells it): off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None
    min_tokens: int = 0
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def process_logits(
    logits: torch.Tensor,
    options: SamplingOptions,
    prompt_ids: list[int],
    output_ids: list[int],
    end_ids: list[int],
) -> torch.Tensor:
    """The row's logits after bias, masks and penalties (not yet temperature-scaled).

    logits: (V,) float32 raw model logits, returned as they are when nothing applies, else a new
    tensor (the caller's logits are never changed). `end_ids` are the tokens that
    would end the row (EOS and stop_token_ids), banned until `min_tokens` tokens exist."""
    if not _changes_logits(options, len(output_ids)):
        return logits
    out = logits.clone()
    vocab = out.shape[0]
    if options.logit_bias:
        ids = torch.tensor([i for i, _ in options.logit_bias], device=out.device)
        out[ids] += torch.tensor([b for _, b in options.logit_bias], device=out.device)
    if options.allowed_token_ids is not None:
        keep = torch.full_like(out, float("-inf"))
        ids = torch.tensor(options.allowed_token_ids, device=out.device)
        keep[ids] = out[ids]
        out = keep
    if len(output_ids) < options.min_tokens and end_ids:
        out[torch.tensor([i for i in end_ids if i < vocab], device=out.device)] = float("-inf")
    if options.repetition_penalty != 1.0:
        # CTRL's penalty (Keskar et al. 2019) over prompt and output, as vLLM and HF apply it.
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), device=out.device)
        if seen.numel():
            values = out[seen]
            penalty = options.repetition_penalty
            out[seen] = torch.where(values > 0, values / penalty, values * penalty)
    if (options.presence_penalty or options.frequency_penalty) and output_ids:
        # OpenAI's definition: over the generated tokens only.
        ids, counts = torch.tensor(output_ids, device=out.device).unique(return_counts=True)
        out[ids] -= options.frequency_penalty * counts.to(out.dtype) + options.presence_penalty
    return out


def _changes_logits(options: SamplingOptions, generated: int) -> bool:
    return bool(
        options.logit_bias
        or options.allowed_token_ids is not None
        or generated < options.min_tokens
        or options.repetition_penalty != 1.0
        or options.presence_penalty
        or options.frequency_penalty
    )


def choose_token(
    processed: torch.Tensor, options: SamplingOptions, generator: torch.Generator
) -> int:
    """The next token from processed (V,) logits: argmax when greedy, else a draw from the
    temperature-scaled distribution truncated by top-k, top-p and min-p, using this row's own
    `generator` (so a seeded request draws the same tokens whatever else is in the batch)."""
    if options.greedy:
        return int(processed.argmax())
    scaled = processed / options.temperature
    if 0 < options.top_k < scaled.shape[0]:
        kth = scaled.topk(options.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    probs = top_p_filter(probs, options.top_p)
    if options.min_p > 0:
        probs = probs.masked_fill(probs < options.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))


def find_stop(text: str, stops: tuple[str, ...], searched: int) -> tuple[int, str] | None:
    """(position, stop string) of the first stop string in `text`, or None. Only text that could
    hold a match not already ruled out is searched: from `searched` minus the longest stop."""
    if not stops:
        return None
    start = max(0, searched - max(len(s) for s in stops) + 1)
    found = [(text.find(s, start), s) for s in stops if s]
    found = [(at, s) for at, s in found if at >= 0]
    return min(found) if found else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` must not be sent yet: a possible start of a stop
    string (it may complete with the next token) or an incomplete UTF-8 character (the tokenizer
    decodes a partial multi-byte character as U+FFFD until its last byte arrives)."""
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:size]):
                hold = size
                break
    if text.endswith("\ufffd"):
        hold = max(hold, len(text) - len(text.rstrip("\ufffd")))
    return hold
