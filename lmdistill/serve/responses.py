"""Responses of the OpenAI-compatible endpoints, in vLLM's shapes: engine events collected into
chat and completion bodies, or streamed as SSE chunks; log-probs in the chat shape (per token,
with bytes), the completions shape (parallel lists) and vLLM's prompt_logprobs shape."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import StreamingResponse

from lmdistill.serve.batcher import ServerShuttingDown
from lmdistill.serve.engine import Delta, Engine, Prompt, TokenLogprob
from lmdistill.serve.model import ServedModel
from lmdistill.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest
from lmdistill.serve.sampling import SamplingOptions

log = logging.getLogger("lmdistill.serve")


@dataclass
class Meta:
    id: str
    created: int
    model: str


@dataclass
class _Choice:
    """One choice's collected output."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs or []
        self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


@dataclass
class _Output:
    """One prompt's collected output: its prompt event and n choices."""

    prompt: Prompt
    choices: list[_Choice]


async def _events(
    engine: Engine, prompts: list[list[int]], options: SamplingOptions
) -> AsyncIterator[tuple[int, Prompt | Delta]]:
    """The events of several prompts' requests as they come, tagged with the prompt's index.
    Leaving early cancels every request still running."""
    queue: asyncio.Queue[tuple[int, Prompt | Delta | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, prompt: list[int]) -> None:
        try:
            async for event in engine.generate(prompt, options):
                queue.put_nowait((index, event))
        except Exception as exc:
            queue.put_nowait((index, exc))
        queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prompts)]
    try:
        finished = 0
        while finished < len(tasks):
            index, event = await queue.get()
            if event is None:
                finished += 1
            elif isinstance(event, BaseException):
                raise event
            else:
                yield index, event
    finally:
        for task in tasks:
            task.cancel()


async def collect(
    engine: Engine, prompts: list[list[int]], options: SamplingOptions
) -> list[_Output]:
    outputs = [_Output(Prompt(p), [_Choice() for _ in range(options.n)]) for p in prompts]
    with as_api_errors():  # the engine logs its own failures with their tracebacks
        async for index, event in _events(engine, prompts, options):
            if isinstance(event, Prompt):
                outputs[index].prompt = event
            else:
                outputs[index].choices[event.choice].add(event)
    return outputs


@contextmanager
def as_api_errors(failed: str | None = None) -> Iterator[None]:
    """Generation failures as OpenAI-shaped errors: 503 while the server shuts down, else 500,
    the traceback logged under `failed` when given. APIErrors pass through as they are."""
    try:
        yield
    except ServerShuttingDown as exc:
        raise APIError(503, str(exc), type="server_error") from None
    except APIError:
        raise
    except Exception:
        if failed is not None:
            log.exception(failed)
        raise APIError(500, "generation failed; see the server log", type="server_error") from None


def _finished(
    choice: dict[str, Any], event: Delta, body: ChatCompletionRequest | CompletionRequest
) -> dict[str, Any]:
    """A streamed choice with what its last chunk carries (vLLM's stop_reason) and, when asked,
    its token ids."""
    if event.finish_reason is not None:
        choice["stop_reason"] = event.stop_reason
    if body.return_token_ids:
        choice["token_ids"] = event.token_ids
    return choice


def _usage(outputs: list[_Output]) -> dict[str, int]:
    # Each prompt is processed once however many choices it has, as OpenAI counts it.
    prompt = sum(len(o.prompt.token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _chat_logprob_entries(
    local: ServedModel, logprobs: list[TokenLogprob], k: int, as_ids: bool
) -> list[dict[str, Any]]:
    entries = []
    for lp in logprobs:
        entry = _chat_token(local, lp.token_id, lp.logprob, as_ids)
        entry["top_logprobs"] = [_chat_token(local, i, v, as_ids) for i, v in lp.top[:k]]
        entries.append(entry)
    return entries


def _chat_token(local: ServedModel, token_id: int, logprob: float, as_ids: bool) -> dict[str, Any]:
    text = local.teacher.token_text(token_id)
    return {
        "token": local.token_str(token_id, as_ids),
        "logprob": _finite(logprob),
        "bytes": token_bytes(text),
    }


def _prompt_logprobs(local: ServedModel, prompt: Prompt) -> list[dict[str, Any] | None] | None:
    """vLLM's prompt_logprobs: per prompt token, {token id: {logprob, rank, decoded_token}} for the
    token itself and the top k at its position; None for the first token."""
    if prompt.logprobs is None:
        return None
    result: list[dict[str, Any] | None] = []
    for lp in prompt.logprobs:
        if lp is None:
            result.append(None)
            continue
        entries = {
            str(lp.token_id): _ranked(local, lp.token_id, lp.logprob, lp.rank),
        }
        for rank, (token_id, value) in enumerate(lp.top, start=1):
            entries.setdefault(str(token_id), _ranked(local, token_id, value, rank))
        result.append(entries)
    return result


def _ranked(local: ServedModel, token_id: int, logprob: float, rank: int) -> dict[str, Any]:
    return {
        "logprob": _finite(logprob),
        "rank": rank,
        "decoded_token": local.teacher.token_text(token_id),
    }


def chat_body(
    local: ServedModel, body: ChatCompletionRequest, output: _Output, meta: Meta
) -> dict[str, Any]:
    k = body.top_logprobs or 0
    choices = []
    for index, choice in enumerate(output.choices):
        logprobs = None
        if body.logprobs:
            content = _chat_logprob_entries(
                local, choice.logprobs, k, body.return_tokens_as_token_ids
            )
            logprobs = {"content": content, "refusal": None}
        entry: dict[str, Any] = {
            "index": index,
            "message": {"role": "assistant", "content": choice.text},
            "logprobs": logprobs,
            "finish_reason": choice.finish_reason,
            "stop_reason": choice.stop_reason,
        }
        if body.return_token_ids:
            entry["token_ids"] = choice.token_ids
        choices.append(entry)
    response: dict[str, Any] = {
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": _usage([output]),
        "prompt_logprobs": _prompt_logprobs(local, output.prompt),
    }
    if body.return_token_ids:
        response["prompt_token_ids"] = output.prompt.token_ids
    return response


def _legacy_logprobs(
    local: ServedModel,
    logprobs: list[TokenLogprob | None],
    token_ids: list[int],
    k: int,
    as_ids: bool,
    offset: int,
) -> dict[str, Any]:
    """The completions API's log-prob shape: parallel lists of tokens, their log-probs, a
    {token: logprob} dict of the top k plus the token itself (as vLLM gives it), and offsets."""
    tokens, values, tops, offsets = [], [], [], []
    for token_id, lp in zip(token_ids, logprobs, strict=True):
        token = local.token_str(token_id, as_ids)
        tokens.append(token)
        offsets.append(offset)
        offset += len(local.teacher.token_text(token_id))
        if lp is None:
            values.append(None)
            tops.append(None)
            continue
        values.append(_finite(lp.logprob))
        top = {local.token_str(i, as_ids): _finite(v) for i, v in lp.top[:k]}
        top.setdefault(token, _finite(lp.logprob))
        tops.append(top)
    return {
        "tokens": tokens,
        "token_logprobs": values,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def completion_body(
    local: ServedModel,
    body: CompletionRequest,
    outputs: list[_Output],
    texts: list[str],
    meta: Meta,
) -> dict[str, Any]:
    choices = []
    for p, (output, prompt_text) in enumerate(zip(outputs, texts, strict=True)):
        prompt_ids = output.prompt.token_ids
        for c, choice in enumerate(output.choices):
            text = (prompt_text if body.echo else "") + choice.text
            logprobs = None
            if body.logprobs is not None:
                ids, lps = choice.token_ids, list(choice.logprobs)
                if body.echo:
                    prompt_lps = output.prompt.logprobs or [None] * len(prompt_ids)
                    ids, lps = prompt_ids + ids, [*prompt_lps, *lps]
                logprobs = _legacy_logprobs(
                    local, lps, ids, body.logprobs, body.return_tokens_as_token_ids, 0
                )
            entry: dict[str, Any] = {
                "index": p * body.n + c,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": choice.finish_reason,
                "stop_reason": choice.stop_reason,
                "prompt_logprobs": _prompt_logprobs(local, output.prompt)
                if body.prompt_logprobs is not None
                else None,
            }
            if body.return_token_ids:
                entry["prompt_token_ids"] = prompt_ids
                entry["token_ids"] = choice.token_ids
            choices.append(entry)
    return {
        "id": meta.id,
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
        "usage": _usage(outputs),
    }


def sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except APIError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream")


def _chunk(
    meta: Meta,
    kind: str,
    choices: list[dict[str, Any]],
    body: ChatCompletionRequest | CompletionRequest,
    outputs: list[_Output],
) -> dict[str, Any]:
    """One streamed chunk. With include_usage every chunk has a null usage (the last, choiceless
    chunk has the totals); with vLLM's continuous_usage_stats each has the usage so far."""
    out: dict[str, Any] = {
        "id": meta.id,
        "object": kind,
        "created": meta.created,
        "model": meta.model,
        "choices": choices,
    }
    options = body.stream_options
    if options is not None and options.continuous_usage_stats:
        out["usage"] = _usage(outputs)
    elif options is not None and options.include_usage:
        out["usage"] = None
    return out


async def chat_chunks(
    local: ServedModel,
    body: ChatCompletionRequest,
    prompts: list[list[int]],
    options: SamplingOptions,
    meta: Meta,
) -> AsyncIterator[dict[str, Any]]:
    """chat.completion.chunk objects: first each choice's role, then its text as it becomes
    final, then its finish reason; a last chunk with usage and no choices when asked."""

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return _chunk(meta, "chat.completion.chunk", choices, body, outputs)

    outputs = [_Output(Prompt(p), [_Choice() for _ in range(options.n)]) for p in prompts]
    for index in range(options.n):
        delta = {"role": "assistant", "content": ""}
        yield chunk([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}])
    with as_api_errors("a streamed chat request failed"):
        async for p, event in _events(local.engine, prompts, options):
            if isinstance(event, Prompt):
                outputs[p].prompt = event
                continue
            outputs[p].choices[event.choice].add(event)
            logprobs = None
            if body.logprobs and event.logprobs:
                content = _chat_logprob_entries(
                    local, event.logprobs, body.top_logprobs or 0, body.return_tokens_as_token_ids
                )
                logprobs = {"content": content, "refusal": None}
            if not event.text and event.finish_reason is None and logprobs is None:
                continue
            choice: dict[str, Any] = {
                "index": event.choice,
                "delta": {"content": event.text} if event.text else {},
                "logprobs": logprobs,
                "finish_reason": event.finish_reason,
            }
            yield chunk([_finished(choice, event, body)])
    if body.stream_options and body.stream_options.include_usage:
        yield {**chunk([]), "usage": _usage(outputs)}


async def completion_chunks(
    local: ServedModel,
    body: CompletionRequest,
    prompts: list[list[int]],
    texts: list[str],
    options: SamplingOptions,
    meta: Meta,
) -> AsyncIterator[dict[str, Any]]:
    """text_completion chunks: the echoed prompt first when asked, then each choice's text as it
    becomes final, its last chunk with the finish reason; usage at the end when asked."""
    as_ids = body.return_tokens_as_token_ids

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return _chunk(meta, "text_completion", choices, body, outputs)

    outputs = [_Output(Prompt(p), [_Choice() for _ in range(options.n)]) for p in prompts]
    offsets = [[0] * options.n for _ in prompts]
    with as_api_errors("a streamed completion request failed"):
        async for p, event in _events(local.engine, prompts, options):
            if isinstance(event, Prompt):
                outputs[p].prompt = event
                if not body.echo:
                    continue
                ids = event.token_ids
                lps = event.logprobs or [None] * len(ids)
                for c in range(options.n):
                    logprobs = None
                    if body.logprobs is not None:
                        logprobs = _legacy_logprobs(local, lps, ids, body.logprobs, as_ids, 0)
                        offsets[p][c] = len(texts[p])
                    entry = {"index": p * body.n + c, "text": texts[p], "logprobs": logprobs}
                    yield chunk([{**entry, "finish_reason": None}])
                continue
            outputs[p].choices[event.choice].add(event)
            logprobs = None
            if body.logprobs is not None and event.logprobs:
                logprobs = _legacy_logprobs(
                    local,
                    list(event.logprobs),
                    event.token_ids,
                    body.logprobs,
                    as_ids,
                    offsets[p][event.choice],
                )
                offsets[p][event.choice] = logprobs["text_offset"][-1] + len(
                    local.teacher.token_text(event.token_ids[-1])
                )
            if not event.text and event.finish_reason is None and logprobs is None:
                continue
            choice: dict[str, Any] = {
                "index": p * body.n + event.choice,
                "text": event.text,
                "logprobs": logprobs,
                "finish_reason": event.finish_reason,
            }
            yield chunk([_finished(choice, event, body)])
    if body.stream_options and body.stream_options.include_usage:
        yield {**chunk([]), "usage": _usage(outputs)}


def _finite(value: float) -> float:
    """A log-prob JSON can carry: -inf (a token masked out) becomes -9999.0, as vLLM writes it."""
    return max(value, -9999.0)


def token_bytes(token: str) -> list[int]:
    """UTF-8 bytes of a token; a partial character arrives as OpenAI writes it, `bytes:\\xe2`."""
    if token.startswith("bytes:\\x"):
        try:
            return list(bytes.fromhex(token.removeprefix("bytes:").replace("\\x", "")))
        except ValueError:
            pass
    return list(token.encode("utf-8"))
