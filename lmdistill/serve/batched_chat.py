"""Chat on the request batcher, for a teacher that is not a local model (an API teacher proxied
through `lmdistill serve`) or when continuous batching is off (`bench/serve.py`'s baseline). It
takes OpenAI's core chat fields only; any other field set gets a 400 naming it."""

from __future__ import annotations

import time
import uuid
from typing import Any

from lmdistill.errors import UserError
from lmdistill.serve.batcher import Batcher, ServerShuttingDown
from lmdistill.serve.model import to_message
from lmdistill.serve.protocol import APIError, ChatCompletionRequest
from lmdistill.serve.responses import token_bytes
from lmdistill.teachers.base import Capability, Generation, SamplingParams, Teacher


async def chat_on_batcher(
    batcher: Batcher,
    teacher: Teacher,
    body: ChatCompletionRequest,
    model_id: str,
    default_max_tokens: int,
) -> dict[str, Any]:
    """Chat on the request batcher: for a teacher that is not a local model (or when continuous
    batching is off). It takes OpenAI's core fields only; the rest get a 400 naming them."""
    params = _batched_params(body, teacher, default_max_tokens)
    messages = [to_message(m, i) for i, m in enumerate(body.messages)]
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
    logprobs = body.logprob_count()
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
    return {"token": token, "logprob": logprob, "bytes": token_bytes(token)}
