"""Request bodies of the OpenAI-compatible API as vLLM's server accepts them, and their check.

OpenAI's fields plus vLLM's extra sampling fields (top_k, min_p, repetition_penalty, min_tokens,
stop_token_ids, prompt_logprobs, return_tokens_as_token_ids, ...). Every field is either honoured
or refused with a 400 that names it: an unknown field is an error (as OpenAI answers), and a known
field this server cannot honour (tools, response_format, beam search, ...) is refused when set,
so a sample never silently comes from another distribution than the one asked for (issue #18)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lmdistill.serve.sampling import SamplingOptions

MAX_LOGPROBS = 20  # OpenAI's limit for top_logprobs; vLLM's default --max-logprobs


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
        self.status, self.message, self.type = status, message, type
        self.param, self.code = param, code

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.type, "param": self.param}
        return {"error": {**error, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage in every chunk


class _Request(BaseModel):
    """Fields shared by chat and completions requests."""

    model_config = ConfigDict(extra="forbid")

    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    min_tokens: int = Field(default=0, ge=0)
    n: int = Field(default=1, ge=1, le=128)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    return_tokens_as_token_ids: bool = False
    return_token_ids: bool = False  # vLLM: prompt_token_ids and token_ids in the response
    stream: bool = False
    stream_options: StreamOptions | None = None
    add_special_tokens: bool | None = None
    # Accepted and without effect on the samples.
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    request_id: str | None = None
    priority: int = 0
    # Known fields this server cannot honour: a 400 names them when they ask for anything.
    best_of: int | None = None
    use_beam_search: bool | None = None
    length_penalty: float | None = None
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    logits_processors: Any = None
    prediction: Any = None

    def unsupported(self) -> str | None:
        """The first field set to something this server cannot do, or None."""
        asks = {
            "best_of": self.best_of not in (None, self.n),
            "use_beam_search": bool(self.use_beam_search),
            "length_penalty": self.length_penalty not in (None, 1.0),
            "response_format": (self.response_format or {}).get("type", "text") != "text",
            "structured_outputs": self.structured_outputs is not None,
            "guided_json": self.guided_json is not None,
            "guided_regex": self.guided_regex is not None,
            "guided_choice": self.guided_choice is not None,
            "guided_grammar": self.guided_grammar is not None,
            "bad_words": bool(self.bad_words),
            "truncate_prompt_tokens": self.truncate_prompt_tokens is not None,
            "logits_processors": self.logits_processors is not None,
            "prediction": self.prediction is not None,
            "priority": self.priority != 0,
            "spaces_between_special_tokens": not self.spaces_between_special_tokens,
        }
        return next((name for name, asked in asks.items() if asked), None)

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def sampling_options(
        self, max_tokens: int, logprobs: int | None, vocab_size: int
    ) -> SamplingOptions:
        """The engine's settings for this request; `max_tokens` and `logprobs` are resolved by the
        endpoint (their fields differ between chat and completions)."""
        if (field := self.unsupported()) is not None:
            raise APIError(400, f"{field} is not supported by lmdistill serve", param=field)
        if self.stream_options is not None and not self.stream:
            message = "stream_options is only allowed when stream is true"
            raise APIError(400, message, param="stream_options")
        if self.stream and self.prompt_logprobs is not None:
            # As vLLM: prompt log-probs come back whole, in a non-streamed response.
            message = "prompt_logprobs is not available when stream is true"
            raise APIError(400, message, param="prompt_logprobs")
        bias = tuple(_logit_bias(self.logit_bias or {}, vocab_size))
        for name in ("allowed_token_ids", "stop_token_ids"):
            for token in getattr(self, name) or []:
                if not 0 <= token < vocab_size:
                    raise APIError(
                        400, f"{name}: token {token} is not in the vocabulary", param=name
                    )
        if self.min_tokens > max_tokens:
            message = f"min_tokens ({self.min_tokens}) must be <= max_tokens ({max_tokens})"
            raise APIError(400, message, param="min_tokens")
        return SamplingOptions(
            max_tokens=max_tokens,
            # OpenAI's defaults: temperature 1, top_p 1.
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(0, self.top_k or 0),
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=bias,
            allowed_token_ids=tuple(self.allowed_token_ids) if self.allowed_token_ids else None,
            min_tokens=self.min_tokens,
            n=self.n,
            seed=self.seed,
            stop=self.stops(),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )


class ChatMessage(BaseModel):
    # Extra fields (name, tool_calls, tool_call_id) pass through to the chat template.
    model_config = ConfigDict(extra="allow")

    # OpenAI's roles; "developer" is its newer name for system. Any other role is a 400, not text
    # rendered into the template.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    # Known, not honoured when set.
    echo: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    modalities: list[str] | None = None
    audio: Any = None
    reasoning_effort: str | None = None
    web_search_options: Any = None
    documents: Any = None

    def logprob_count(self) -> int | None:
        """The top log-probs per generated token to give: None when logprobs is off."""
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported(self) -> str | None:
        asks = {
            "echo": self.echo,
            "tools": bool(self.tools),
            "tool_choice": self.tool_choice not in (None, "none", "auto"),
            "functions": bool(self.functions),
            "function_call": self.function_call not in (None, "none", "auto"),
            "modalities": self.modalities not in (None, ["text"]),
            "audio": self.audio is not None,
            "reasoning_effort": self.reasoning_effort is not None,
            "web_search_options": self.web_search_options is not None,
            "documents": self.documents is not None,
        }
        field = next((name for name, asked in asks.items() if asked), None)
        return field or super().unsupported()


class CompletionRequest(_Request):
    # A string, a list of strings, token ids, or a list of token-id lists (as vLLM takes them).
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None

    def unsupported(self) -> str | None:
        return "suffix" if self.suffix else super().unsupported()


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the template."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class ReloadWeightsRequest(BaseModel):
    """lmdistill's /reload_weights (off unless the server allows it): a safetensors file of
    the served model's weights, on a filesystem the server can read."""

    model_config = ConfigDict(extra="forbid")

    path: str


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]


def _logit_bias(bias: dict[str, float], vocab_size: int) -> list[tuple[int, float]]:
    pairs = []
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(
                400, f"logit_bias: '{key}' is not a token id", param="logit_bias"
            ) from None
        if not 0 <= token < vocab_size or not -100 <= value <= 100:
            message = (
                f"logit_bias: token {key} must be in the vocabulary and its bias in [-100, 100]"
            )
            raise APIError(400, message, param="logit_bias")
        pairs.append((token, value))
    return pairs
