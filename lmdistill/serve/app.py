"""An OpenAI-compatible HTTP API shaped like vLLM's server, so the clients written for `vllm serve`
(the `openai` client, lm-evaluation-harness, on-policy samplers) work against `lmdistill serve`:

- `POST /v1/chat/completions` and `POST /v1/completions`, streamed (SSE) or not, with stop strings
  and token ids, log-probs (including the EOS token), prompt log-probs (`echo`, `prompt_logprobs`),
  token ids (`return_tokens_as_token_ids`, `return_token_ids`) and vLLM's sampling fields;
- `GET /v1/models`, `POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info`, `GET /health`.

A local HF model runs on the continuous-batching `Engine`. Any other text teacher (an API teacher
proxied through this server) gets the chat endpoint only, on the request batcher, without the
features that need the model itself.

References: https://platform.openai.com/docs/api-reference/chat/create and vLLM's
OpenAI-compatible server docs (https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmdistill.errors import UserError
from lmdistill.serve.batcher import Batcher
from lmdistill.serve.engine import Delta, Engine, Prompt, ServerShuttingDown, TokenLogprob
from lmdistill.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from lmdistill.serve.sampling import SamplingOptions
from lmdistill.teachers.base import Capability, Generation, Message, SamplingParams, Teacher
from lmdistill.teachers.local import HFTeacher

log = logging.getLogger("lmdistill.serve")


def create_app(
    teacher: Teacher,
    *,
    api_key: str | None = None,
    model_name: str | None = None,
    max_batch: int = 16,
    batch_wait_s: float = 0.005,
    default_max_tokens: int = 512,
    continuous: bool = True,
) -> FastAPI:
    """The FastAPI app serving `teacher` as model `model_name` (default: the teacher's name).

    With `api_key`, every /v1 request needs `Authorization: Bearer <api_key>`. A local
    model decodes up to `max_batch` choices at once with continuous batching; `continuous=False`
    (or a teacher that is not a local model) uses the request batcher instead: requests arriving
    within `batch_wait_s` of each other run as one batch, chat only. A chat request without
    max_tokens gets `default_max_tokens` (at most what the context has left)."""
    teacher.require(Capability.TEXT, "lmdistill serve")
    model_id = model_name or teacher.name
    engine = None
    if continuous and isinstance(teacher, HFTeacher):
        engine = Engine(
            teacher.model,
            teacher.tokenizer,
            teacher.eos_ids,
            max_batch=max_batch,
            pad_id=teacher.pad_id,
        )
    batcher = Batcher(teacher, max_batch=max_batch, wait_s=batch_wait_s)
    local = _Local(teacher, engine) if engine is not None else None
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if engine is not None:
            engine.start()
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            if engine is not None:
                await asyncio.to_thread(engine.stop)

    app = FastAPI(
        title="lmdistill serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.batcher, app.state.engine = batcher, engine
    app.state.teacher, app.state.model_id = teacher, model_id
    _add_error_handlers(app)
    if api_key:
        app.add_middleware(_KeyCheck, api_key=api_key)

    def need_local(what: str) -> _Local:
        if local is None:
            raise APIError(400, f"{what} needs a local model; '{model_id}' is not one")
        return local

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(model_id, created, local)]}

    @app.get("/v1/models/{model}")
    async def get_model(model: str) -> dict[str, Any]:
        _check_model(model, model_id)
        return _model_card(model_id, created, local)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        body: ChatCompletionRequest, raw: Request
    ) -> dict[str, Any] | StreamingResponse:
        _check_model(body.model, model_id)
        if local is None:
            return await _batched_chat(batcher, teacher, body, model_id, default_max_tokens)
        prompt = local.chat_prompt(body)
        options = local.options(body, len(prompt), default_max_tokens, _chat_logprobs(body))
        meta = _Meta(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model_id)
        if body.stream:
            return _sse(_chat_chunks(local, body, [prompt], options, meta))
        outputs = await _unless_disconnected(raw, _collect(local.engine, [prompt], options))
        return _chat_body(local, body, outputs[0], meta)

    @app.post("/v1/completions", response_model=None)
    async def completions(
        body: CompletionRequest, raw: Request
    ) -> dict[str, Any] | StreamingResponse:
        _check_model(body.model, model_id)
        served = need_local("/v1/completions")
        prompts, texts = served.completion_prompts(body)
        logprobs = body.logprobs
        options = served.options(body, max(map(len, prompts)), None, logprobs)
        if body.echo and logprobs is not None:
            # Echoed prompt tokens carry log-probs too: lm-eval's loglikelihood reads them.
            options = replace(options, prompt_logprobs=max(logprobs, body.prompt_logprobs or 0))
        meta = _Meta(f"cmpl-{uuid.uuid4().hex}", int(time.time()), model_id)
        if body.stream:
            return _sse(_completion_chunks(served, body, prompts, texts, options, meta))
        outputs = await _unless_disconnected(raw, _collect(served.engine, prompts, options))
        return _completion_body(served, body, outputs, texts, meta)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        served = need_local("/tokenize")
        if body.model is not None:
            _check_model(body.model, model_id)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")
        if body.messages is not None:
            ids = served.template_ids(
                body.messages,
                body.add_generation_prompt,
                body.continue_final_message,
                body.chat_template_kwargs,
                bool(body.add_special_tokens),
            )
        else:
            add = True if body.add_special_tokens is None else body.add_special_tokens
            ids = served.encode(body.prompt or "", add)
        strs = served.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {
            "count": len(ids),
            "max_model_len": served.context_length,
            "tokens": ids,
            "token_strs": strs,
        }

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        served = need_local("/detokenize")
        if body.model is not None:
            _check_model(body.model, model_id)
        served.check_ids(body.tokens, "tokens")
        return {"prompt": served.tokenizer.decode(body.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        # vLLM's --enable-tokenizer-info-endpoint: lm-eval uses it (with /tokenize) to tokenize
        # remotely instead of loading the tokenizer itself.
        served = need_local("/tokenizer_info")
        tok = served.tokenizer
        return {
            "tokenizer_class": type(tok).__name__,
            "eos_token": tok.eos_token,
            "bos_token": tok.bos_token,
            "pad_token": tok.pad_token,
            "unk_token": tok.unk_token,
            "chat_template": tok.chat_template,
            "model_max_length": served.context_length,
        }

    return app


# ------------------------------------------------------------------------------- local model
class _Local:
    """What the endpoints need from a local model: its tokenizer, context and engine."""

    def __init__(self, teacher: HFTeacher, engine: Engine) -> None:
        self.teacher, self.engine, self.tokenizer = teacher, engine, teacher.tokenizer
        self.context_length: int | None = engine.context_length
        self.vocab_size = int(teacher.model.config.vocab_size)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def check_ids(self, ids: list[int], param: str) -> None:
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"{param}: token id {bad} is not in the vocabulary", param=param)

    def template_ids(
        self,
        messages: list[ChatMessage],
        add_generation_prompt: bool,
        continue_final_message: bool,
        template_kwargs: dict[str, Any] | None,
        add_special_tokens: bool,
    ) -> list[int]:
        if add_generation_prompt and continue_final_message:
            message = "continue_final_message needs add_generation_prompt=false"
            raise APIError(400, message, param="continue_final_message")
        rendered = [_to_message(m, i) for i, m in enumerate(messages)]
        try:
            text = self.tokenizer.apply_chat_template(
                rendered,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **(template_kwargs or {}),
            )
        except Exception as exc:  # the template refused these messages (roles, order, content)
            raise APIError(400, f"the chat template failed: {exc}", param="messages") from None
        # The rendered template already holds its special tokens: add none twice.
        return self.encode(text, add_special_tokens)

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        ids = self.template_ids(
            body.messages,
            body.add_generation_prompt,
            body.continue_final_message,
            body.chat_template_kwargs,
            bool(body.add_special_tokens),
        )
        return self._checked_prompt(ids, "messages")

    def completion_prompts(self, body: CompletionRequest) -> tuple[list[list[int]], list[str]]:
        """Each prompt's token ids and text (a token-id prompt's text is its decoding)."""
        raw = body.prompt
        add = True if body.add_special_tokens is None else body.add_special_tokens
        if isinstance(raw, str):
            items: list[str | list[int]] = [raw]
        elif raw and all(isinstance(x, int) for x in raw):
            items = [list(raw)]  # type: ignore[arg-type]
        else:
            items = list(raw)  # type: ignore[arg-type]
        if not items:
            raise APIError(400, "prompt must not be empty", param="prompt")
        prompts, texts = [], []
        for item in items:
            if isinstance(item, str):
                prompts.append(self._checked_prompt(self.encode(item, add), "prompt"))
                texts.append(item)
            else:
                self.check_ids(item, "prompt")
                prompts.append(self._checked_prompt(item, "prompt"))
                texts.append(self.tokenizer.decode(item))
        return prompts, texts

    def _checked_prompt(self, ids: list[int], param: str) -> list[int]:
        if not ids:
            raise APIError(400, f"{param}: the prompt has no tokens", param=param)
        if self.context_length is not None and len(ids) >= self.context_length:
            message = (
                f"This model's maximum context length is {self.context_length} tokens. However, "
                f"your prompt has {len(ids)} tokens. Please reduce the length of the prompt."
            )
            raise APIError(400, message, param=param)
        return ids

    def options(
        self,
        body: ChatCompletionRequest | CompletionRequest,
        prompt_tokens: int,
        default_max_tokens: int | None,
        logprobs: int | None,
    ) -> SamplingOptions:
        """The engine settings: max_tokens is checked against the context as vLLM does (asked for
        explicitly and too long: a 400; not asked for: what the context has left)."""
        room = None if self.context_length is None else self.context_length - prompt_tokens
        if isinstance(body, ChatCompletionRequest):
            asked = body.max_completion_tokens or body.max_tokens
        else:
            asked = body.max_tokens
        if asked is None:
            fallback = default_max_tokens if default_max_tokens is not None else room or 16
            max_tokens = fallback if room is None else min(fallback, room)
        else:
            if room is not None and asked > room:
                message = (
                    f"This model's maximum context length is {self.context_length} tokens. "
                    f"However, you requested {prompt_tokens + asked} tokens ({prompt_tokens} in "
                    f"the prompt, {asked} in the completion). Please reduce the length of the "
                    "prompt or completion."
                )
                raise APIError(400, message, param="max_tokens")
            max_tokens = asked
        return body.sampling_options(max_tokens, logprobs, self.vocab_size)

    def token_str(self, token_id: int, as_id: bool) -> str:
        return f"token_id:{token_id}" if as_id else self.teacher.token_text(token_id)


@dataclass
class _Meta:
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


def _chat_logprobs(body: ChatCompletionRequest) -> int | None:
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


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


async def _collect(
    engine: Engine, prompts: list[list[int]], options: SamplingOptions
) -> list[_Output]:
    outputs = [_Output(Prompt(p), [_Choice() for _ in range(options.n)]) for p in prompts]
    try:
        async for index, event in _events(engine, prompts, options):
            if isinstance(event, Prompt):
                outputs[index].prompt = event
            else:
                outputs[index].choices[event.choice].add(event)
    except ServerShuttingDown as exc:
        raise APIError(503, str(exc), type="server_error") from None
    except APIError:
        raise
    except Exception:  # logged with its traceback by the engine
        raise APIError(500, "generation failed; see the server log", type="server_error") from None
    return outputs


async def _unless_disconnected(raw: Request, job: Any) -> Any:
    """Await `job`, cancelling it (and so its generation) if the client goes away first."""
    task = asyncio.ensure_future(job)

    async def watch() -> None:
        while not await raw.is_disconnected():
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        raise APIError(499, "the client disconnected")
    return task.result()


def _usage(outputs: list[_Output]) -> dict[str, int]:
    # Each prompt is processed once however many choices it has, as OpenAI counts it.
    prompt = sum(len(o.prompt.token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.choices)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


# ------------------------------------------------------------------------- response shapes
def _chat_logprob_entries(
    local: _Local, logprobs: list[TokenLogprob], k: int, as_ids: bool
) -> list[dict[str, Any]]:
    entries = []
    for lp in logprobs:
        entry = _chat_token(local, lp.token_id, lp.logprob, as_ids)
        entry["top_logprobs"] = [_chat_token(local, i, v, as_ids) for i, v in lp.top[:k]]
        entries.append(entry)
    return entries


def _chat_token(local: _Local, token_id: int, logprob: float, as_ids: bool) -> dict[str, Any]:
    text = local.teacher.token_text(token_id)
    return {
        "token": local.token_str(token_id, as_ids),
        "logprob": _finite(logprob),
        "bytes": _token_bytes(text),
    }


def _prompt_logprobs(local: _Local, prompt: Prompt) -> list[dict[str, Any] | None] | None:
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


def _ranked(local: _Local, token_id: int, logprob: float, rank: int) -> dict[str, Any]:
    return {
        "logprob": _finite(logprob),
        "rank": rank,
        "decoded_token": local.teacher.token_text(token_id),
    }


def _chat_body(
    local: _Local, body: ChatCompletionRequest, output: _Output, meta: _Meta
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
    local: _Local,
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


def _completion_body(
    local: _Local,
    body: CompletionRequest,
    outputs: list[_Output],
    texts: list[str],
    meta: _Meta,
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


# ---------------------------------------------------------------------------------- streaming
def _sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def lines() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except APIError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream")


def _chunk(
    meta: _Meta,
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


async def _chat_chunks(
    local: _Local,
    body: ChatCompletionRequest,
    prompts: list[list[int]],
    options: SamplingOptions,
    meta: _Meta,
) -> AsyncIterator[dict[str, Any]]:
    """chat.completion.chunk objects: first each choice's role, then its text as it becomes
    final, then its finish reason; a last chunk with usage and no choices when asked."""

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return _chunk(meta, "chat.completion.chunk", choices, body, outputs)

    outputs = [_Output(Prompt(p), [_Choice() for _ in range(options.n)]) for p in prompts]
    for index in range(options.n):
        delta = {"role": "assistant", "content": ""}
        yield chunk([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}])
    try:
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
            if event.finish_reason is not None:
                choice["stop_reason"] = event.stop_reason
            if body.return_token_ids:
                choice["token_ids"] = event.token_ids
            yield chunk([choice])
    except ServerShuttingDown as exc:
        raise APIError(503, str(exc), type="server_error") from None
    except Exception:
        log.exception("a streamed chat request failed")
        raise APIError(500, "generation failed; see the server log", type="server_error") from None
    if body.stream_options and body.stream_options.include_usage:
        yield {**chunk([]), "usage": _usage(outputs)}


async def _completion_chunks(
    local: _Local,
    body: CompletionRequest,
    prompts: list[list[int]],
    texts: list[str],
    options: SamplingOptions,
    meta: _Meta,
) -> AsyncIterator[dict[str, Any]]:
    """text_completion chunks: the echoed prompt first when asked, then each choice's text as it
    becomes final, its last chunk with the finish reason; usage at the end when asked."""
    as_ids = body.return_tokens_as_token_ids

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return _chunk(meta, "text_completion", choices, body, outputs)

    outputs = [_Output(Prompt(p), [_Choice() for _ in range(options.n)]) for p in prompts]
    offsets = [[0] * options.n for _ in prompts]
    try:
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
            if event.finish_reason is not None:
                choice["stop_reason"] = event.stop_reason
            if body.return_token_ids:
                choice["token_ids"] = event.token_ids
            yield chunk([choice])
    except ServerShuttingDown as exc:
        raise APIError(503, str(exc), type="server_error") from None
    except Exception:
        log.exception("a streamed completion request failed")
        raise APIError(500, "generation failed; see the server log", type="server_error") from None
    if body.stream_options and body.stream_options.include_usage:
        yield {**chunk([]), "usage": _usage(outputs)}


# --------------------------------------------------------------- the request batcher (chat only)
async def _batched_chat(
    batcher: Batcher,
    teacher: Teacher,
    body: ChatCompletionRequest,
    model_id: str,
    default_max_tokens: int,
) -> dict[str, Any]:
    """Chat on the request batcher: for a teacher that is not a local model (or when continuous
    batching is off). It takes OpenAI's core fields only; the rest get a 400 naming them."""
    params = _batched_params(body, teacher, default_max_tokens)
    messages = [_to_message(m, i) for i, m in enumerate(body.messages)]
    started = time.time()
    try:
        result = await batcher.submit(messages, params)
    except ServerShuttingDown as exc:
        raise APIError(503, str(exc), type="server_error") from None
    except Exception:  # already logged with its traceback by the batcher
        raise APIError(500, "generation failed; see the server log", type="server_error") from None
    if result.failure is not None:
        failure = result.failure
        status = 400 if failure.reason in ("bad_request", "prompt_too_long") else 500
        kind = "invalid_request_error" if status == 400 else "server_error"
        raise APIError(status, failure.detail or failure.reason, type=kind, code=failure.reason)
    return _batched_body(result.generations, body, model_id, int(started))


# Fields the request batcher honours; any other field set to a non-default value is a 400.
_BATCHED_FIELDS = {
    "model",
    "messages",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "seed",
    "logprobs",
    "top_logprobs",
    "user",
    "metadata",
    "store",
    "service_tier",
    "request_id",
}


def _batched_params(
    body: ChatCompletionRequest, teacher: Teacher, default_max_tokens: int
) -> SamplingParams:
    for name in body.model_fields_set - _BATCHED_FIELDS:
        if getattr(body, name) != type(body).model_fields[name].default:
            raise APIError(400, f"{name} is not supported for this model", param=name)
    logprobs = _chat_logprobs(body)
    if logprobs is not None and not teacher.can(Capability.TOPK_LOGPROBS):
        raise APIError(400, "this model cannot return logprobs", param="logprobs")
    try:
        return SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            max_tokens=body.max_completion_tokens or body.max_tokens or default_max_tokens,
            n=body.n,
            seed=body.seed,
            # At least 1, so the teacher records each chosen token's logprob; the response trims
            # the top list back to what was asked for.
            top_logprobs=0 if logprobs is None else max(1, logprobs),
        )
    except UserError as exc:
        raise APIError(400, str(exc)) from None


def _batched_body(
    generations: list[Generation], body: ChatCompletionRequest, model_id: str, created: int
) -> dict[str, Any]:
    choices = []
    for index, generation in enumerate(generations):
        logprobs = None
        if body.logprobs and generation.token_logprobs is not None:
            tops = generation.top_logprobs or [[] for _ in generation.token_logprobs]
            content = []
            for (token, logprob), top in zip(generation.token_logprobs, tops, strict=True):
                entry = _text_token(token, logprob)
                entry["top_logprobs"] = [
                    _text_token(t, lp) for t, lp in top[: body.top_logprobs or 0]
                ]
                content.append(entry)
            logprobs = {"content": content, "refusal": None}
        choices.append(
            {
                "index": index,
                "message": {"role": "assistant", "content": generation.text},
                "logprobs": logprobs,
                "finish_reason": generation.finish_reason,
            }
        )
    prompt_tokens = generations[0].prompt_tokens if generations else 0
    completion_tokens = sum(g.completion_tokens for g in generations)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": created,
        "model": model_id,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _text_token(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": _token_bytes(token)}


# ---------------------------------------------------------------------------------- helpers
def _finite(value: float) -> float:
    """A log-prob JSON can carry: -inf (a token masked out) becomes -9999.0, as vLLM writes it."""
    return max(value, -9999.0)


def _token_bytes(token: str) -> list[int]:
    """UTF-8 bytes of a token; a partial character arrives as OpenAI writes it, `bytes:\\xe2`."""
    if token.startswith("bytes:\\x"):
        try:
            return list(bytes.fromhex(token.removeprefix("bytes:").replace("\\x", "")))
        except ValueError:
            pass
    return list(token.encode("utf-8"))


def _model_card(model_id: str, created: int, local: _Local | None) -> dict[str, Any]:
    card = {"id": model_id, "object": "model", "created": created, "owned_by": "lmdistill"}
    if local is not None and local.context_length is not None:
        card["max_model_len"] = local.context_length
    return card


def _check_model(requested: str, model_id: str) -> None:
    if requested != model_id:
        raise APIError(
            404,
            f"The model '{requested}' does not exist; this server serves '{model_id}'",
            param="model",
            code="model_not_found",
        )


def _to_message(message: ChatMessage, index: int) -> Message:
    """A plain message dict for the chat template; OpenAI content parts are joined to text."""
    data = message.model_dump(exclude_none=True)
    if data["role"] == "developer":  # OpenAI's newer name for the system role
        data["role"] = "system"
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(
                    400,
                    f"only text content parts are supported, got type '{part.get('type')}'",
                    param=f"messages.{index}.content",
                )
            texts.append(part["text"])
        data["content"] = "".join(texts)
    elif content is None:
        data["content"] = ""
    return data


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # OpenAI answers malformed requests with 400 (FastAPI's default is 422).
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return _error(APIError(400, "the request body is not valid JSON"))
        # loc is like ("body", "messages", 0, "role"): name the field as OpenAI does, messages.0.role
        param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        if first.get("type") == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
            return _error(APIError(400, message, param=param))
        message = first.get("msg", "invalid request")
        return _error(APIError(400, f"{param}: {message}" if param else message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(APIError(exc.status_code, str(exc.detail)))


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


class _KeyCheck:
    """Bearer-key check as plain ASGI middleware (not `@app.middleware`, whose wrapper gets in
    the way of streamed responses and of noticing a client that went away)."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.expected = app, api_key.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # Only /v1 needs the key, as in vLLM: clients (lm-eval) probe /tokenizer_info and
        # /tokenize without one, and those reveal nothing but the tokenizer.
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            headers = dict(scope.get("headers") or [])
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            # compare_digest: the time taken must not reveal how much of a guess was right.
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode("latin-1"), self.expected
            ):
                error = APIError(401, "Incorrect API key provided.", code="invalid_api_key")
                await _error(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)
