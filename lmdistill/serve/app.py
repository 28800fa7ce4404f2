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
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmdistill.serve.batched_chat import chat_on_batcher
from lmdistill.serve.batcher import Batcher
from lmdistill.serve.engine import Engine
from lmdistill.serve.model import ServedModel
from lmdistill.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ReloadWeightsRequest,
    TokenizeRequest,
)
from lmdistill.serve.responses import (
    Meta,
    chat_body,
    chat_chunks,
    collect,
    completion_body,
    completion_chunks,
    sse,
)
from lmdistill.teachers.base import Capability, Teacher
from lmdistill.teachers.local import HFTeacher


def create_app(
    teacher: Teacher,
    *,
    api_key: str | None = None,
    model_name: str | None = None,
    max_batch: int = 16,
    batch_wait_s: float = 0.005,
    default_max_tokens: int = 512,
    continuous: bool = True,
    allow_weight_reload: bool = False,
) -> FastAPI:
    """The FastAPI app serving `teacher` as model `model_name` (default: the teacher's name).

    With `api_key`, every /v1 request needs `Authorization: Bearer <api_key>`. A local
    model decodes up to `max_batch` choices at once with continuous batching; `continuous=False`
    (or a teacher that is not a local model) uses the request batcher instead: requests arriving
    within `batch_wait_s` of each other run as one batch, chat only. A chat request without
    max_tokens gets `default_max_tokens` (at most what the context has left).

    `allow_weight_reload` opens POST /reload_weights {"path": FILE}: the served model's weights
    are replaced by those of a safetensors file (a trainer sampling its student through this
    server pushes its current weights so; `on_policy.server` in a recipe). Off by default: it
    reads any file the server can, so it needs the API key when there is one."""
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
    local = ServedModel(teacher, engine) if engine is not None else None
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

    def need_local(what: str) -> ServedModel:
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
            return await chat_on_batcher(batcher, teacher, body, model_id, default_max_tokens)
        prompt = local.chat_prompt(body)
        options = local.options(body, len(prompt), default_max_tokens, body.logprob_count())
        meta = Meta(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model_id)
        if body.stream:
            return sse(chat_chunks(local, body, [prompt], options, meta))
        outputs = await _unless_disconnected(raw, collect(local.engine, [prompt], options))
        return chat_body(local, body, outputs[0], meta)

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
        meta = Meta(f"cmpl-{uuid.uuid4().hex}", int(time.time()), model_id)
        if body.stream:
            return sse(completion_chunks(served, body, prompts, texts, options, meta))
        outputs = await _unless_disconnected(raw, collect(served.engine, prompts, options))
        return completion_body(served, body, outputs, texts, meta)

    @app.post("/reload_weights")
    async def reload_weights(body: ReloadWeightsRequest) -> dict[str, Any]:
        if not allow_weight_reload:
            message = "weight reload is off; start the server with --allow-weight-reload"
            raise APIError(403, message, code="reload_not_allowed")
        served = need_local("/reload_weights")
        tensors = await served.engine.between_steps(lambda: served.load_weights(body.path))
        return {"status": "ok", "tensors": tensors}

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


def _model_card(model_id: str, created: int, local: ServedModel | None) -> dict[str, Any]:
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


_KEYED = ("/v1", "/reload_weights")  # the paths that need the API key, when there is one


class _KeyCheck:
    """Bearer-key check as plain ASGI middleware (not `@app.middleware`, whose wrapper gets in
    the way of streamed responses and of noticing a client that went away)."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.expected = app, api_key.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # /v1 needs the key, as in vLLM (and /reload_weights, which reads files): clients
        # (lm-eval) probe /tokenizer_info and /tokenize without one, and those reveal nothing
        # but the tokenizer.
        if scope["type"] == "http" and scope["path"].startswith(_KEYED):
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
