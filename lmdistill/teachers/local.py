"""A local Hugging Face causal LM as a teacher: generated text, full logits, and top-k log-probs.

Generation is batched with the KV cache (`model.generate`) over LEFT-padded prompts, so every row's
next token sits at the last column. Requests are sorted by prompt length before batching, so a batch
holds prompts of similar length and little compute is spent on padding."""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from lmdistill.errors import UserError
from lmdistill.teachers.base import (
    Capability,
    Failure,
    Generation,
    GenerationResult,
    Message,
    SamplingParams,
    Teacher,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class HFTeacher(Teacher):
    """A causal LM loaded with transformers.

    `model_dir_or_model` is an HF model dir (weights, config, tokenizer with a chat template) or an
    already-loaded model, which then needs `tokenizer=` and is used on its own device and dtype.
    `batch_size` counts sequences per `generate` call, so with `n` samples a batch holds
    `batch_size // n` prompts (greedy decodes each prompt once and copies the answer n times)."""

    capabilities = (
        Capability.TEXT
        | Capability.FULL_LOGITS
        | Capability.TOPK_LOGPROBS
        | Capability.CONTINUATION
    )

    def __init__(
        self,
        model_dir_or_model: str | Path | PreTrainedModel,
        *,
        tokenizer: PreTrainedTokenizerBase | None = None,
        batch_size: int = 16,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        name: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        if isinstance(model_dir_or_model, (str, Path)):
            path = Path(model_dir_or_model)
            self.model, self.tokenizer = _load_model_dir(path, tokenizer, device, dtype)
            self.name = name or path.name
        else:
            if tokenizer is None:
                raise TypeError("HFTeacher(model) needs tokenizer= when given a model object")
            if device is not None or dtype is not None:
                raise TypeError("device/dtype apply to a model dir; move a model object yourself")
            self.model, self.tokenizer = model_dir_or_model, tokenizer
            self.name = name or str(getattr(model_dir_or_model, "name_or_path", "") or "model")
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError(f"teacher '{self.name}': its tokenizer has no chat template")
        self.eos_ids = _eos_token_ids(self.model, self.tokenizer)
        pad_id = self.tokenizer.pad_token_id
        self.pad_id: int = self.eos_ids[0] if pad_id is None else int(pad_id)
        # Number of model.generate calls so far: lets callers (and tests) see how requests were batched.
        self.generate_calls = 0
        self._token_text: dict[int, str] = {}

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    # ----------------------------------------------------------------------------------- text
    def encode_chat(self, messages: list[Message]) -> list[int]:
        """Token ids of `messages` rendered with the chat template, ending with the assistant prompt."""
        # tokenize=False returns the rendered string; tokenizing it ourselves with
        # add_special_tokens=False avoids a second BOS (the template already writes any special
        # tokens) and sidesteps transformers 5 returning a BatchEncoding when tokenize=True.
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def pre_query(self, system: str | None = None) -> str:
        """The template rendered up to the first user message's content: a marker stands in for
        the content and is cut off, so any template (a default system turn, BOS, role headers)
        gives its own pre-query text."""
        marker = "\u2063lmdistill-user-content\u2063"
        messages = [{"role": "system", "content": system}] if system else []
        text = self.tokenizer.apply_chat_template(
            [*messages, {"role": "user", "content": marker}], tokenize=False
        )
        if marker not in text:
            raise UserError(f"teacher '{self.name}': its chat template drops the user's message")
        return text[: text.index(marker)]

    def iter_continue(
        self, texts: Sequence[str], params: SamplingParams
    ) -> Iterator[GenerationResult]:
        """Continue raw texts in input order, `batch_size // n` per `generate` call; batch k is
        seeded with `seed + k * per_batch`, so a resumed run that starts at a batch boundary
        draws what the uninterrupted one would have."""
        per_batch = max(1, self.batch_size // _rows_per_prompt(params))
        for start in range(0, len(texts), per_batch):
            chunk = texts[start : start + per_batch]
            ids = [list(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in chunk]
            indices = list(range(start, start + len(chunk)))
            yield from self.generate_batch(indices, ids, params, start)

    def iter_generate(
        self, conversations: Sequence[list[Message]], params: SamplingParams
    ) -> Iterator[GenerationResult]:
        """Generate `params.n` responses per conversation, longest prompts first, yielding each
        batch's results as soon as it completes."""
        prompts: dict[int, list[int]] = {}
        for index, messages in enumerate(conversations):
            try:
                ids = self.encode_chat(messages)
            except Exception as exc:  # a template error (bad roles, bad content) fails one request
                yield GenerationResult(index, failure=Failure("bad_request", str(exc), attempts=1))
                continue
            limit = self.context_length
            if limit is not None and len(ids) >= limit:
                detail = f"prompt has {len(ids)} tokens; the context holds {limit}"
                yield GenerationResult(
                    index, failure=Failure("prompt_too_long", detail, attempts=1)
                )
                continue
            prompts[index] = ids
        # Longest first: the biggest batch runs first, so running out of memory shows up at once.
        order = sorted(prompts, key=lambda i: len(prompts[i]), reverse=True)
        if _two_passes(params):
            yield from self._greedy_in_two_passes(order, prompts, params)
            return
        per_batch = max(1, self.batch_size // _rows_per_prompt(params))
        for start in range(0, len(order), per_batch):
            indices = order[start : start + per_batch]
            yield from self.generate_batch(indices, [prompts[i] for i in indices], params, start)

    def _greedy_in_two_passes(
        self, order: list[int], prompts: dict[int, list[int]], params: SamplingParams
    ) -> Iterator[GenerationResult]:
        """Greedy answers decoded `FIRST_PASS_TOKENS` at a time for every prompt, then the
        answers still going continued together, from prompt + tokens so far, to `max_tokens`.

        A batch decodes until its longest answer ends, so one long answer among short ones keeps
        every row of its batch busy: on the quickstart's prompts (most answers ~30 tokens, one in
        six runs to the limit) a single pass did useful work in 39% of its row-steps. Greedy
        decoding is deterministic, so continuing an answer later gives the tokens it would have
        had (up to float rounding, which batch composition moves as well)."""
        first = SamplingParams(temperature=0.0, max_tokens=FIRST_PASS_TOKENS)
        going: list[tuple[int, list[int], list[int], float]] = []  # index, prompt, tokens, s
        for start in range(0, len(order), self.batch_size):
            indices = order[start : start + self.batch_size]
            batch = [prompts[i] for i in indices]
            rows, latency = self._decode(batch, first)
            for index, prompt, tokens in zip(indices, batch, rows, strict=True):
                ended = (
                    any(t in self.eos_ids for t in tokens)
                    or len(tokens) < FIRST_PASS_TOKENS
                    or (self.context_length or 1 << 62) <= len(prompt) + len(tokens)
                )
                if ended:  # at its end of turn, or at the context's end
                    yield self._result(index, params, [tokens], len(prompt), latency)
                else:
                    going.append((index, prompt, tokens, latency))
        rest = SamplingParams(temperature=0.0, max_tokens=params.max_tokens - FIRST_PASS_TOKENS)
        going.sort(key=lambda g: len(g[1]), reverse=True)
        for start in range(0, len(going), self.batch_size):
            chunk = going[start : start + self.batch_size]
            rows, latency = self._decode([prompt + tokens for _, prompt, tokens, _ in chunk], rest)
            for (index, prompt, tokens, before), more in zip(chunk, rows, strict=True):
                yield self._result(index, params, [tokens + more], len(prompt), before + latency)

    def generate_batch(
        self,
        indices: list[int],
        prompts: list[list[int]],
        params: SamplingParams,
        seed_offset: int = 0,
    ) -> list[GenerationResult]:
        """One `model.generate` call over `prompts` (token ids), `params.n` samples each.

        With a seed, each batch seeds the RNG with `seed + seed_offset`, so a run is reproducible
        for the same inputs and batch size (sampled rows share one RNG stream, so a different
        batching draws different samples)."""
        recorder = _LogprobRecorder(params.top_logprobs) if params.top_logprobs > 0 else None
        new_tokens, latency = self._decode(prompts, params, seed_offset, recorder)
        recorded = recorder.finished if recorder else None
        rows = _rows_per_prompt(params)
        return [
            self._result(
                index,
                params,
                new_tokens[b * rows : (b + 1) * rows],
                len(prompt),
                latency,
                recorded,
                b * rows,
            )
            for b, (index, prompt) in enumerate(zip(indices, prompts, strict=True))
        ]

    def _decode(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        seed_offset: int = 0,
        recorder: _LogprobRecorder | None = None,
    ) -> tuple[list[list[int]], float]:
        """One `model.generate` call: the new tokens of each row (`_rows_per_prompt` rows per
        prompt, grouped by prompt; rows that ended early are padded past their EOS) and the
        call's seconds."""
        input_ids, attention_mask = left_pad(prompts, self.pad_id)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        max_new = params.max_tokens
        if self.context_length is not None:  # never decode past the positions the model knows
            max_new = max(1, min(max_new, self.context_length - input_ids.shape[1]))
        started = time.perf_counter()
        with torch.no_grad(), _eval_mode(self.model), _seeded(params, seed_offset, self.device):
            sequences = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=self._generation_config(params, max_new),
                logits_processor=LogitsProcessorList([recorder] if recorder else []),
            )
        latency = time.perf_counter() - started
        self.generate_calls += 1
        if recorder is not None:
            recorder.finished = recorder.finish(sequences)
        # (B * rows, T): generate() repeats each prompt in place, so rows come grouped by prompt.
        return sequences[:, input_ids.shape[1] :].tolist(), latency

    def _result(
        self,
        index: int,
        params: SamplingParams,
        rows: list[list[int]],
        prompt_tokens: int,
        latency: float,
        recorded: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        first_row: int = 0,
    ) -> GenerationResult:
        """One prompt's result from its generated rows."""
        generations = [
            self._generation(tokens, first_row + r, recorded, prompt_tokens, latency)
            for r, tokens in enumerate(rows)
        ]
        # Greedy decoding has one answer per prompt: decode it once, hand out n copies.
        generations += [copy.deepcopy(generations[0]) for _ in range(params.n - len(rows))]
        return GenerationResult(index, generations=generations)

    def _generation(
        self,
        tokens: list[int],
        row: int,
        recorded: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
        prompt_tokens: int,
        latency: float,
    ) -> Generation:
        content, finish_reason, completion_tokens = split_at_eos(tokens, self.eos_ids)
        generation = Generation(
            text=self.tokenizer.decode(content, skip_special_tokens=True),
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            latency_s=latency,
        )
        if recorded is not None:
            top_ids, top_logprobs, chosen_logprobs = (t[row, : len(content)] for t in recorded)
            generation.top_logprobs = [
                [(self.token_text(i), lp) for i, lp in zip(ids, lps, strict=True)]
                for ids, lps in zip(top_ids.tolist(), top_logprobs.tolist(), strict=True)
            ]
            generation.token_logprobs = [
                (self.token_text(i), lp)
                for i, lp in zip(content, chosen_logprobs.tolist(), strict=True)
            ]
            generation.top_ids = top_ids.tolist()
            generation.token_ids = [int(i) for i in content]
        return generation

    def token_text(self, token_id: int) -> str:
        """The text of one token. A byte-level token holding part of a multi-byte character is
        written as OpenAI does, `bytes:\\xe2\\x80`, so no byte is lost."""
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            if "\ufffd" in text:
                raw = _byte_level_bytes(self.tokenizer.convert_ids_to_tokens(token_id))
                if raw is not None and not _is_utf8(raw):
                    text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            self._token_text[token_id] = text
        return text

    def _generation_config(self, params: SamplingParams, max_new_tokens: int) -> GenerationConfig:
        sample = params.temperature > 0
        # Every knob is set explicitly: generate() fills unset (None) fields from the checkpoint's
        # generation_config.json, which may ask for top_k, repetition penalty or beam search.
        # OpenAI-style sampling is temperature + top-p only, hence top_k=0 (off) when sampling.
        return GenerationConfig(
            do_sample=sample,
            temperature=params.temperature if sample else 1.0,
            top_p=params.top_p if sample else 1.0,
            top_k=0 if sample else 50,  # 50 is the greedy default, set only to avoid a warning
            num_beams=1,
            repetition_penalty=1.0,
            min_length=0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=_rows_per_prompt(params),
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
        )

    # --------------------------------------------------------------------------- distributions
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Next-token logits for given sequences.

        input_ids, attention_mask: (B, T); mask 1 for real tokens, 0 for padding (left or right).
        Returns (B, T, V) float32 on the model's device; [b, t] is the distribution of token t + 1.
        Values at padded positions are meaningless. No gradients flow to the teacher."""
        with torch.no_grad(), _eval_mode(self.model):
            return self._forward_logits(input_ids, attention_mask)

    def topk_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most likely next tokens and their log-probs at every position.

        input_ids, attention_mask: (B, T) as for `logits`. Returns (ids (B, T, k) int64,
        logprobs (B, T, k) float32), best first, on the model's device. Rows run `batch_size` at a
        time so the (rows, T, V) logits never exceed one batch."""
        vocab = self.model.config.vocab_size
        if not 1 <= k <= vocab:
            raise UserError(f"k must be in [1, {vocab}], got {k}")
        ids_out, logprobs_out = [], []
        with torch.no_grad(), _eval_mode(self.model):
            for start in range(0, input_ids.shape[0], self.batch_size):
                rows = slice(start, start + self.batch_size)
                logits = self._forward_logits(input_ids[rows], attention_mask[rows])
                top = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
                ids_out.append(top.indices)
                logprobs_out.append(top.values)
        return torch.cat(ids_out), torch.cat(logprobs_out)

    def _forward_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        # A plain forward numbers positions 0..T-1 whatever the mask, shifting every left-padded
        # row. RoPE attention does not notice a shift, but learned absolute positions (GPT-2) do,
        # so count positions from each row's first real token, as generate() does.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        return out.logits.float()

    def close(self) -> None:
        self._token_text.clear()


# Greedy answers longer than twice this are decoded in two passes (`_greedy_in_two_passes`).
FIRST_PASS_TOKENS = 32


def _two_passes(params: SamplingParams) -> bool:
    """Greedy, without recorded log-probs, and long enough for a second pass to pay."""
    return (
        params.temperature == 0
        and params.top_logprobs == 0
        and params.max_tokens > 2 * FIRST_PASS_TOKENS
    )


def _rows_per_prompt(params: SamplingParams) -> int:
    """Sequences generated per prompt: n when sampling; 1 when greedy, whose n answers are equal
    (and transformers refuses num_return_sequences > 1 without sampling)."""
    return params.n if params.temperature > 0 else 1


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token-id lists into (B, T) ids and attention mask, padding on the left."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids, mask


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, printable character -> byte (Radford et al. 2019,
    openai/gpt-2 encoder.py `bytes_to_unicode`), used by GPT-2, Llama 3, SmolLM2, Qwen tokenizers."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    byte_values, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            printable.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(byte_values, printable, strict=True)}


def _byte_level_bytes(piece: str | None) -> bytes | None:
    """The raw bytes of a byte-level BPE token string, or None if it is not one."""
    decoder = _byte_decoder()
    if not piece or any(ch not in decoder for ch in piece):
        return None
    return bytes(decoder[ch] for ch in piece)


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def split_at_eos(tokens: list[int], eos_ids: Sequence[int]) -> tuple[list[int], str, int]:
    """(content tokens, finish_reason, completion_tokens) of one generated row.

    The row ends at its first EOS ("stop"; the EOS counts as generated but is not content), else
    it ran to the token limit ("length"). Anything after the first EOS is batch padding."""
    eos = set(eos_ids)
    for position, token in enumerate(tokens):
        if token in eos:
            return tokens[:position], "stop", position + 1
    return tokens, "length", len(tokens)


class _LogprobRecorder(LogitsProcessor):
    """A logits processor that records the model's own distribution at each decoding step.

    transformers runs custom processors before the sampling warpers (temperature, top-p), so the
    scores seen here are the raw logits: the recorded log-probs are the teacher's distribution at
    temperature 1, which is what distillation wants, whatever temperature sampled the text. The
    sampled token is only known at the next step (it is the last input id then), so its log-prob
    is gathered one step late from the previous step's distribution."""

    def __init__(self, k: int) -> None:
        self.k = k
        self._top_ids: list[torch.Tensor] = []  # per step: (B, k)
        self._top_logprobs: list[torch.Tensor] = []  # per step: (B, k)
        self._chosen: list[torch.Tensor] = []  # per step: (B,)
        self._previous: torch.Tensor | None = None  # (B, V) log-probs of the last step
        self.finished: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logprobs = torch.log_softmax(scores.float(), dim=-1)
        if self._previous is not None:
            self._chosen.append(self._previous.gather(1, input_ids[:, -1:]).squeeze(1))
        top = logprobs.topk(min(self.k, logprobs.shape[-1]), dim=-1)
        self._top_ids.append(top.indices)
        self._top_logprobs.append(top.values)
        self._previous = logprobs
        return scores

    def finish(self, sequences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(top ids (B, T, k), top log-probs (B, T, k), chosen-token log-probs (B, T)) on CPU,
        given the final (B, P + T) sequences."""
        if self._previous is not None:
            self._chosen.append(self._previous.gather(1, sequences[:, -1:]).squeeze(1))
            self._previous = None
        return (
            torch.stack(self._top_ids, dim=1).cpu(),
            torch.stack(self._top_logprobs, dim=1).cpu(),
            torch.stack(self._chosen, dim=1).cpu(),
        )


def _load_model_dir(
    path: Path,
    tokenizer: PreTrainedTokenizerBase | None,
    device: str | torch.device | None,
    dtype: str | torch.dtype | None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a Hugging Face model dir (no config.json)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = torch.device(device) if device is not None else _default_device()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, target))
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
    except LOAD_ERRORS as exc:
        raise unloadable(path, exc) from None
    model.to(target).eval()
    return model, tokenizer


# What transformers raises for a model dir with a missing, empty or truncated file.
LOAD_ERRORS = (OSError, ValueError, SafetensorError)


def unloadable(path: Path, exc: Exception) -> UserError:
    """The one-line error for a model dir that does not load (issue 19: before saves were atomic,
    a killed training run left such a final/ behind, and loading it printed a traceback)."""
    text = str(exc).strip()
    first = text.splitlines()[0].rstrip(" :") if text else type(exc).__name__
    return UserError(
        f"{path}: cannot load the model ({first}); if a run was interrupted while saving it, "
        "rerun that run to rebuild it"
    )


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """float32 on CPU (half precision is slow there), bfloat16 on a GPU that has it."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise UserError(f"unknown dtype '{dtype}'; use float32, bfloat16 or float16")
        return resolved
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token that ends a turn: the generation config's EOS ids (chat models often list their
    end-of-turn token there) plus the tokenizer's EOS."""
    ids: list[int] = []
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.append(configured)
    elif configured is not None:
        ids.extend(int(i) for i in configured)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    if not ids:
        raise UserError("the teacher has no EOS token (neither generation config nor tokenizer)")
    return ids


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the duration, restoring a training model afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


@contextlib.contextmanager
def _seeded(params: SamplingParams, offset: int, device: torch.device) -> Iterator[None]:
    """Seed torch's RNG for one sampled batch without disturbing the caller's RNG state."""
    if params.seed is None or params.temperature == 0:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed((params.seed + offset) % 2**64)  # manual_seed takes [0, 2**64)
        yield
