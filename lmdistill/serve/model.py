"""A local model as the server sees it: prompts from chat messages, text or token ids (checked
against its vocabulary and context), and each request's engine settings."""

from __future__ import annotations

from typing import Any

from lmdistill.data import Message
from lmdistill.serve.engine import Engine
from lmdistill.serve.protocol import APIError, ChatCompletionRequest, ChatMessage, CompletionRequest
from lmdistill.serve.sampling import SamplingOptions
from lmdistill.teachers.local import HFTeacher


class ServedModel:
    """What the endpoints need from a local model: its tokenizer, context and engine."""

    def __init__(self, teacher: HFTeacher, engine: Engine) -> None:
        self.teacher, self.engine, self.tokenizer = teacher, engine, teacher.tokenizer
        self.context_length: int | None = engine.context_length
        self.vocab_size = int(teacher.model.config.vocab_size)

    def load_weights(self, path: str) -> int:
        """Copy the tensors of safetensors file `path` into the served model in place (a
        trainer pushing its current student, issue #12); every tensor must name a parameter or
        buffer of the same shape, and every parameter must be given. Returns the tensor count.
        Runs on the engine's thread between steps (`Engine.between_steps`)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        model = self.teacher.model
        try:
            tensors = load_file(path, device=str(model.device))
        except (OSError, SafetensorError) as exc:
            raise APIError(400, f"cannot read {path}: {exc}", param="path") from None
        own = model.state_dict()
        for name, tensor in tensors.items():
            if name not in own:
                raise APIError(400, f"{path}: {name} is not a weight of the model", param="path")
            if tuple(tensor.shape) != tuple(own[name].shape):
                message = (
                    f"{path}: {name} has shape {tuple(tensor.shape)}, "
                    f"the model's is {tuple(own[name].shape)}"
                )
                raise APIError(400, message, param="path")
        given = {own[n].data_ptr() for n in tensors}  # tied weights share one storage
        missing = [n for n, p in model.named_parameters() if p.data_ptr() not in given]
        if missing:
            raise APIError(400, f"{path}: no tensor for {missing[0]}", param="path")
        for name, tensor in tensors.items():
            own[name].copy_(tensor.to(own[name].dtype))
        return len(tensors)

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
        rendered = [to_message(m, i) for i, m in enumerate(messages)]
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


def to_message(message: ChatMessage, index: int) -> Message:
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
