"""An OpenAI-compatible HTTP API over any text teacher: `GET /v1/models` and non-streaming
`POST /v1/chat/completions`, with OpenAI's request fields, response shape and error JSON, so the
official `openai` client (and `OpenAITeacher`) can talk to a local model.

Reference: https://platform.openai.com/docs/api-reference/chat/create"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmdistill.errors import UserError
from lmdistill.serve.batcher import Batcher, ServerShuttingDown
from lmdistill.teachers.base import Capability, Generation, Message, SamplingParams, Teacher

log = logging.getLogger("lmdistill.serve")

MAX_TOP_LOGPROBS = 20  # OpenAI's limit


class APIError(Exception):
    """An error answered as OpenAI-style JSON: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


class ChatMessage(BaseModel):
    # Extra fields (name, tool_calls, tool_call_id) pass through to the chat template.
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(BaseModel):
    """The fields of OpenAI's chat completion request that this server honours; unknown fields are
    ignored, and known ones it cannot honour are rejected in `sampling_params`."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1, le=128)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    stream: bool | None = None
    stop: str | list[str] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


def create_app(
    teacher: Teacher,
    *,
    api_key: str | None = None,
    model_name: str | None = None,
    max_batch: int = 16,
    batch_wait_s: float = 0.005,
    default_max_tokens: int = 512,
) -> FastAPI:
    """The FastAPI app serving `teacher` as model `model_name` (default: the teacher's name).

    With `api_key`, every /v1 request needs `Authorization: Bearer <api_key>`. Requests arriving
    within `batch_wait_s` of each other run as one batch of up to `max_batch`. A request without
    max_tokens gets `default_max_tokens`. `app.state.batcher` exposes batch counters."""
    teacher.require(Capability.TEXT, "lmdistill serve")
    model_id = model_name or teacher.name
    batcher = Batcher(teacher, max_batch=max_batch, wait_s=batch_wait_s)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(
        title="lmdistill serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.batcher = batcher
    app.state.teacher = teacher
    app.state.model_id = model_id
    _add_error_handlers(app)
    if api_key:
        _add_key_check(app, api_key)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(model_id, created)]}

    @app.get("/v1/models/{model}")
    async def get_model(model: str) -> dict[str, Any]:
        _check_model(model, model_id)
        return _model_card(model_id, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest) -> dict[str, Any]:
        _check_model(request.model, model_id)
        params = sampling_params(request, teacher, default_max_tokens)
        messages = [_to_message(m, i) for i, m in enumerate(request.messages)]
        started = time.time()
        try:
            result = await batcher.submit(messages, params)
        except ServerShuttingDown as exc:
            raise APIError(503, str(exc), type="server_error") from None
        except Exception:  # already logged with its traceback by the batcher
            raise APIError(
                500, "generation failed; see the server log", type="server_error"
            ) from None
        if result.failure is not None:
            failure = result.failure
            status = 400 if failure.reason in ("bad_request", "prompt_too_long") else 500
            kind = "invalid_request_error" if status == 400 else "server_error"
            raise APIError(status, failure.detail or failure.reason, type=kind, code=failure.reason)
        return completion_body(result.generations, request, model_id, int(started))

    return app


def sampling_params(
    request: ChatCompletionRequest, teacher: Teacher, default_max_tokens: int
) -> SamplingParams:
    """The request's decoding settings, or a 400 naming the field the server cannot honour."""
    if request.stream:
        raise APIError(400, "streaming is not supported by lmdistill serve", param="stream")
    if request.stop:
        raise APIError(400, "stop sequences are not supported by lmdistill serve", param="stop")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(request, name):
            raise APIError(400, f"{name} is not supported by lmdistill serve", param=name)
    if request.logit_bias:
        raise APIError(400, "logit_bias is not supported by lmdistill serve", param="logit_bias")
    if request.top_logprobs and not request.logprobs:
        raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
    top_logprobs = 0
    if request.logprobs:
        if not teacher.can(Capability.TOPK_LOGPROBS):
            raise APIError(400, "this model cannot return logprobs", param="logprobs")
        # At least 1, so the teacher records each chosen token's logprob; the response trims the
        # top list back to what was asked for.
        top_logprobs = max(1, request.top_logprobs or 0)
    try:
        return SamplingParams(
            # OpenAI's defaults: temperature 1, top_p 1, one choice.
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            max_tokens=request.max_completion_tokens or request.max_tokens or default_max_tokens,
            n=request.n or 1,
            seed=request.seed,
            top_logprobs=top_logprobs,
        )
    except UserError as exc:
        raise APIError(400, str(exc)) from None


def completion_body(
    generations: list[Generation], request: ChatCompletionRequest, model_id: str, created: int
) -> dict[str, Any]:
    """An OpenAI `chat.completion` object for the n generations of one request."""
    choices = []
    for index, generation in enumerate(generations):
        choices.append(
            {
                "index": index,
                "message": {"role": "assistant", "content": generation.text},
                "logprobs": _logprobs(generation, request.top_logprobs or 0)
                if request.logprobs
                else None,
                "finish_reason": generation.finish_reason,
            }
        )
    # The prompt is processed once however many choices it has, as OpenAI counts it.
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


def _logprobs(generation: Generation, top_k: int) -> dict[str, Any] | None:
    if generation.token_logprobs is None:
        return None
    tops = generation.top_logprobs or [[] for _ in generation.token_logprobs]
    content = []
    for (token, logprob), top in zip(generation.token_logprobs, tops, strict=True):
        entry = _token_entry(token, logprob)
        entry["top_logprobs"] = [_token_entry(t, lp) for t, lp in top[:top_k]]
        content.append(entry)
    return {"content": content, "refusal": None}


def _token_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": _token_bytes(token)}


def _token_bytes(token: str) -> list[int]:
    """UTF-8 bytes of a token; a partial character arrives as OpenAI writes it, `bytes:\\xe2`."""
    if token.startswith("bytes:\\x"):
        try:
            return list(bytes.fromhex(token.removeprefix("bytes:").replace("\\x", "")))
        except ValueError:
            pass
    return list(token.encode("utf-8"))


def _model_card(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "lmdistill"}


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
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        # OpenAI answers malformed requests with 400 (FastAPI's default is 422).
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return APIError(400, "the request body is not valid JSON").response()
        # loc is like ("body", "messages", 0, "role"): name the field as OpenAI does, messages.0.role
        param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        message = first.get("msg", "invalid request")
        return APIError(400, f"{param}: {message}" if param else message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail)).response()


def _add_key_check(app: FastAPI, api_key: str) -> None:
    expected = api_key.encode()

    @app.middleware("http")
    async def check_key(request: Request, call_next: Any) -> Any:
        if request.url.path.startswith("/v1"):
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            # compare_digest: the time taken must not reveal how much of a guess was right.
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), expected
            ):
                return APIError(
                    401, "Incorrect API key provided.", code="invalid_api_key"
                ).response()
        return await call_next(request)
