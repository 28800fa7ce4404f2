"""Continuous batching for a local HF causal LM: the server's generation engine.

One worker thread owns the model. Each iteration it (1) prefills the requests that arrived since
the last one, in one left-padded forward, and merges their KV cache into the running batch; (2)
chooses one token for every running row with that row's own settings and RNG; (3) drops rows that
finished or whose client went away; (4) runs one decode forward for the rows left. A request never
waits for a whole batch to finish, only for the current step (issue #18); a request with other
sampling settings joins the same forward, since sampling happens per row after it.

Rows are left-padded to a common width. Each row's positions count its own real tokens, so a row
decodes the same tokens alone or batched (up to float rounding of the padded matmuls). Columns
that are padding in every row are trimmed when rows leave.

Each request gets events on an asyncio queue: one `Prompt` (its token ids, and prompt log-probs
when asked), then `Delta`s per choice until each of its n choices has a `finish_reason`."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer

from lmdistill.serve.batcher import ServerShuttingDown
from lmdistill.serve.sampling import (
    SamplingOptions,
    choose_token,
    find_stop,
    held_back,
    process_logits,
)
from lmdistill.teachers.local import left_pad

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger("lmdistill.serve")


@dataclass
class TokenLogprob:
    """A token's log-prob under the model (temperature 1), its 1-based rank in the vocabulary,
    and the k most likely tokens at that position, best first."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


@dataclass
class Prompt:
    """A request's first event: its prompt ids and, when asked, the log-prob of each prompt token
    given the ones before it (None for the first token, which has no context)."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None] | None = None


@dataclass
class Delta:
    """New output of one choice: the token chosen this step (with its log-prob when asked), the
    text that became final, and on the last delta why the choice ended."""

    choice: int
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    text: str
    finish_reason: str | None = None  # "stop" (EOS, stop string or stop token) or "length"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it


Event = Prompt | Delta


class _Request:
    """One submitted prompt: its settings, where its events go, and whether its client left."""

    def __init__(
        self,
        prompt_ids: list[int],
        options: SamplingOptions,
        loop: asyncio.AbstractEventLoop,
        events: asyncio.Queue[Event | BaseException],
    ) -> None:
        self.prompt_ids, self.options = prompt_ids, options
        self.loop, self.events = loop, events
        self.cancelled = False  # set from the event loop; read by the worker between steps

    def send(self, event: Event | BaseException) -> None:
        # The loop is closed when the server stopped mid-request; nobody listens any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class _Row:
    """One choice of one request being decoded."""

    request: _Request
    choice: int
    generator: torch.Generator
    output_ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already sent
    searched: int = 0  # characters of text already searched for stop strings
    done: bool = False


class Engine:
    """Decodes submitted prompts (token ids) on `model` with continuous batching, up to
    `max_batch` rows (choices) at a time. `start()` before use, `stop()` at the end."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: list[int],
        *,
        max_batch: int = 16,
        pad_id: int | None = None,
        max_prefill_tokens: int = 8192,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.tokenizer = model, tokenizer
        self.eos_ids = list(eos_ids)
        self.pad_id = self.eos_ids[0] if pad_id is None else pad_id
        self.max_batch = max_batch
        # Padded prompt tokens prefilled in one step: bounds the step's memory (prompt log-probs
        # keep (B, T, V) logits) and how long running rows wait for it.
        self.max_prefill_tokens = max_prefill_tokens
        self.context_length: int | None = getattr(model.config, "max_position_embeddings", None)
        # Counters for tests and the benchmark: forwards run, and the most rows decoded at once.
        self.prefills = 0
        self.decode_steps = 0
        self.most_rows = 0
        self._inbox: collections.deque[_Request] = collections.deque()
        # Work for the worker thread once no row is decoding (new weights): (fn, loop, future).
        self._control: collections.deque[tuple[Callable[[], Any], Any, Any]] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._rows: list[_Row] = []
        self._prefilling: list[_Request] = []
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros(0, 0, dtype=torch.long)  # (rows, width): 1 real, 0 padding
        self._logits = torch.zeros(0, 0)  # (rows, V): each row's next-token logits
        # Merging KV caches of different widths needs plain full-attention layers; a model with
        # other cache layers (sliding windows) only takes new requests when the batch is empty.
        self._can_join = True
        # transformers 5.x renames forward's past_key_values to cache (the old name warns).
        forward = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward else "past_key_values"

    # ---------------------------------------------------------------------------- event loop side
    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="lmdistill-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the worker after its current step and fail every request not finished."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        error = ServerShuttingDown("the server is shutting down")
        for request in {id(r.request): r.request for r in self._rows}.values():
            request.send(error)
        while self._inbox:
            self._inbox.popleft().send(error)
        while self._control:
            _, loop, future = self._control.popleft()
            loop.call_soon_threadsafe(_settle, future, None, error)
        self._rows = []

    async def generate(
        self, prompt_ids: list[int], options: SamplingOptions
    ) -> AsyncIterator[Event]:
        """The events of one request, ending after the last choice's finishing delta. Leaving the
        iteration early (a client that went away) cancels the request's rows at the next step."""
        if self._stopping or self._thread is None:
            raise ServerShuttingDown("the engine is not running")
        events: asyncio.Queue[Event | BaseException] = asyncio.Queue()
        request = _Request(list(prompt_ids), options, asyncio.get_running_loop(), events)
        self._inbox.append(request)
        self._wake.set()
        finished, prompt_seen = 0, False
        try:
            while not prompt_seen or finished < options.n:
                event = await events.get()
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, Prompt):
                    prompt_seen = True
                elif event.finish_reason is not None:
                    finished += 1
                yield event
        finally:
            if finished < options.n:
                request.cancelled = True
                self._wake.set()

    async def between_steps(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the worker thread once no row is decoding, and return its result: requests
        in flight finish first, new ones wait until it is done (the way to swap the weights)."""
        if self._stopping or self._thread is None:
            raise ServerShuttingDown("the engine is not running")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._control.append((fn, loop, future))
        self._wake.set()
        return await future

    @property
    def running_rows(self) -> int:
        return len(self._rows)

    # ------------------------------------------------------------------------------ worker side
    def _run(self) -> None:
        # Grad mode is per thread: this thread never needs gradients.
        with torch.inference_mode():
            while not self._stopping:
                try:
                    if self._control and not self._rows:
                        self._run_control()
                        continue
                    admitted = [] if self._control else self._admit()
                    if self._rows:
                        self._step()
                    elif not admitted:
                        self._wake.wait(0.1)
                        self._wake.clear()
                except Exception as exc:
                    log.exception("generation failed; failing the requests in flight")
                    self._fail_all(exc)

    def _run_control(self) -> None:
        fn, loop, future = self._control.popleft()
        try:
            result = fn()
        except Exception as exc:  # the caller gets the error; the engine goes on
            loop.call_soon_threadsafe(_settle, future, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)

    def _admit(self) -> list[_Request]:
        """Prefill waiting requests that fit in the batch and add their rows."""
        if self._rows and not self._can_join:
            return []
        room = self.max_batch - len(self._rows)
        taken: list[_Request] = []
        width = 0
        while self._inbox:
            request = self._inbox[0]
            if request.cancelled:
                self._inbox.popleft()
                continue
            rows = request.options.n if request.options.max_tokens > 0 else 0
            wider = max(width, len(request.prompt_ids))
            # A request wider than max_batch or the prefill budget still runs, alone, rather
            # than never.
            too_big = rows > room or wider * (len(taken) + 1) > self.max_prefill_tokens
            if too_big and (taken or self._rows):
                break
            taken.append(self._inbox.popleft())
            room -= rows
            width = wider
        # Remembered until their rows join the batch: a failing prefill must fail them too.
        self._prefilling = taken
        if taken:
            self._prefill(taken)
        self._prefilling = []
        return taken

    def _prefill(self, requests: list[_Request]) -> None:
        ids, mask = left_pad([r.prompt_ids for r in requests], self.pad_id)
        ids, mask = ids.to(self.model.device), mask.to(self.model.device)
        cache = DynamicCache(config=self.model.config)
        scored = any(r.options.prompt_logprobs is not None for r in requests)
        out = self.model(
            **{self._cache_kwarg: cache},
            input_ids=ids,
            attention_mask=mask,
            position_ids=_positions(mask),
            use_cache=True,
            logits_to_keep=0 if scored else 1,  # 0: every position, for prompt log-probs
        )
        self.prefills += 1
        logits = out.logits.float()
        keep: list[int] = []
        new_rows: list[_Row] = []
        for b, request in enumerate(requests):
            options = request.options
            prompt_logprobs = None
            if options.prompt_logprobs is not None:
                width = len(request.prompt_ids)
                prompt_logprobs = [
                    None,
                    *_score(logits[b, -width:-1], request.prompt_ids[1:], options.prompt_logprobs),
                ]
            request.send(Prompt(list(request.prompt_ids), prompt_logprobs))
            if options.max_tokens == 0:  # scoring only: nothing to generate
                for choice in range(options.n):
                    request.send(Delta(choice, [], None, "", "length"))
                continue
            for choice in range(options.n):
                keep.append(b)
                generator = torch.Generator(device=self.model.device)
                generator.manual_seed(_row_seed(options.seed, choice))
                new_rows.append(_Row(request, choice, generator))
        if not new_rows:
            return
        self._can_join = self._can_join and all(
            type(layer) is DynamicLayer for layer in cache.layers
        )
        if keep != list(range(len(requests))):  # n > 1, or a scoring-only request: reorder rows
            index = torch.tensor(keep, device=ids.device)
            _select_cache(cache, index)
            mask, logits = mask[index], logits[index]
        self._join(cache, mask, logits[:, -1], new_rows)

    def _join(
        self, cache: DynamicCache, mask: torch.Tensor, logits: torch.Tensor, rows: list[_Row]
    ) -> None:
        """Add prefilled rows to the running batch, left-padding whichever side is narrower."""
        if not self._rows:
            self._cache, self._mask, self._logits, self._rows = cache, mask, logits, rows
        else:
            assert self._cache is not None
            width = max(self._mask.shape[1], mask.shape[1])
            for old, new in zip(self._cache.layers, cache.layers, strict=True):
                old.keys = torch.cat([_pad_left(old.keys, width), _pad_left(new.keys, width)])
                old.values = torch.cat([_pad_left(old.values, width), _pad_left(new.values, width)])
            self._mask = torch.cat(
                [
                    F.pad(self._mask, (width - self._mask.shape[1], 0)),
                    F.pad(mask, (width - mask.shape[1], 0)),
                ]
            )
            self._logits = torch.cat([self._logits, logits])
            self._rows = self._rows + rows
        self.most_rows = max(self.most_rows, len(self._rows))

    def _step(self) -> None:
        """Choose a token for every row, drop finished rows, and decode the rest one position."""
        for row, logits in zip(self._rows, self._logits, strict=True):
            if row.request.cancelled:
                row.done = True
            else:
                self._advance(row, logits)
        keep = [i for i, row in enumerate(self._rows) if not row.done]
        if len(keep) < len(self._rows):
            self._keep_rows(keep)
        if not self._rows:
            return
        assert self._cache is not None
        device = self.model.device
        tokens = torch.tensor([[row.output_ids[-1]] for row in self._rows], device=device)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self._rows), 1)], dim=1)
        out = self.model(
            input_ids=tokens,
            attention_mask=self._mask,
            position_ids=self._mask.sum(-1, keepdim=True) - 1,
            use_cache=True,
            **{self._cache_kwarg: self._cache},
        )
        self.decode_steps += 1
        self._logits = out.logits[:, -1].float()

    def _advance(self, row: _Row, logits: torch.Tensor) -> None:
        """Choose one token for `row`, check its stop conditions and send what became final."""
        options = row.request.options
        ends = list(options.stop_token_ids) + ([] if options.ignore_eos else self.eos_ids)
        processed = process_logits(logits, options, row.request.prompt_ids, row.output_ids, ends)
        token = choose_token(processed, options, row.generator)
        logprobs = None
        if options.logprobs is not None:  # the model's own distribution, not the processed one
            logprobs = _score(logits[None], [token], options.logprobs)
        row.output_ids.append(token)
        text, finish, stop_reason = self._text_and_finish(row, token)
        final = len(text) if finish else len(text) - held_back(text, options.stop)
        delta = text[row.sent : final] if final > row.sent else ""
        row.sent = max(row.sent, final)
        row.request.send(Delta(row.choice, [token], logprobs, delta, finish, stop_reason))
        row.done = finish is not None

    def _text_and_finish(self, row: _Row, token: int) -> tuple[str, str | None, str | int | None]:
        """The row's text so far, and (finish_reason, stop_reason) if `token` ended it: a stop
        token or EOS (counted and scored, but not text), a stop string (the text is cut there),
        max_tokens or the end of the context."""
        options = row.request.options
        finish: str | None = None
        stop_reason: str | int | None = None
        content = row.output_ids
        if token in options.stop_token_ids:
            finish, stop_reason, content = "stop", token, row.output_ids[:-1]
        elif token in self.eos_ids and not options.ignore_eos:
            finish, content = "stop", row.output_ids[:-1]
        # The whole text is decoded again: a token's text can depend on its neighbours.
        text = self.tokenizer.decode(content, skip_special_tokens=options.skip_special_tokens)
        hit = find_stop(text, options.stop, row.searched) if finish is None else None
        if hit is not None:
            at, stop = hit
            text = text[: at + len(stop)] if options.include_stop_str_in_output else text[:at]
            finish, stop_reason = "stop", stop
        row.searched = len(text)
        total = len(row.request.prompt_ids) + len(row.output_ids)
        out_of_room = self.context_length is not None and total >= self.context_length
        if finish is None and (len(row.output_ids) >= options.max_tokens or out_of_room):
            finish = "length"
        return text, finish, stop_reason

    def _keep_rows(self, keep: list[int]) -> None:
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self._cache, self._mask, self._logits = None, self._mask[:0], self._logits[:0]
            return
        assert self._cache is not None
        index = torch.tensor(keep, device=self._mask.device)
        _select_cache(self._cache, index)
        self._mask, self._logits = self._mask[index], self._logits[index]
        if self._can_join:
            # Columns that are padding in every remaining row only cost attention compute.
            first = int(self._mask.any(0).long().argmax())
            if first > 0:
                for layer in self._cache.layers:
                    layer.keys, layer.values = (
                        layer.keys[..., first:, :],
                        layer.values[..., first:, :],
                    )
                self._mask = self._mask[:, first:]

    def _fail_all(self, error: BaseException) -> None:
        requests = {id(r): r for r in self._prefilling}
        requests.update({id(row.request): row.request for row in self._rows})
        for request in requests.values():
            request.send(error)
        self._rows, self._cache, self._prefilling = [], None, []


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted from each left-padded row's first real token, as generate() does."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _score(
    logits: torch.Tensor, targets: list[int], k: int, chunk: int = 256
) -> list[TokenLogprob]:
    """Log-prob, rank and top-k of each target under each row of (T, V) logits, `chunk` rows at a
    time: a long prompt's float32 log-softmax would otherwise be another (T, V) copy."""
    result = []
    for start in range(0, len(targets), chunk):
        rows = logits[start : start + chunk].float()
        logprobs = torch.log_softmax(rows, dim=-1)
        target = torch.tensor(targets[start : start + chunk], device=logprobs.device)
        chosen = logprobs.gather(1, target[:, None]).squeeze(1)
        ranks = (logprobs > chosen[:, None]).sum(-1) + 1
        top = logprobs.topk(k, dim=-1) if k > 0 else None
        for t, token in enumerate(target.tolist()):
            pairs = (
                list(zip(top.indices[t].tolist(), top.values[t].tolist(), strict=True))
                if top
                else []
            )
            result.append(TokenLogprob(token, float(chosen[t]), int(ranks[t]), pairs))
    return result


def _row_seed(seed: int | None, choice: int) -> int:
    """The RNG seed of one choice: the request's seed mixed with the choice index (so n choices
    differ), or a fresh random one."""
    if seed is None:
        return secrets.randbits(63)
    return (seed * 0x9E3779B97F4A7C15 + choice) % 2**63


def _select_cache(cache: DynamicCache, index: torch.Tensor) -> None:
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[index], layer.values[index]


def _pad_left(states: torch.Tensor, width: int) -> torch.Tensor:
    """(B, H, T, D) key/value states zero-padded on the left of T to `width`; the attention mask
    hides the padding."""
    return F.pad(states, (0, 0, width - states.shape[-2], 0))
