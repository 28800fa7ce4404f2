"""How tool-use conversations are written as text, for prompting a model and for training one.

A tool-use conversation is stored in the OpenAI function-calling shape: a `tools` list of
`{"type": "function", "function": {"name", "description", "parameters"}}` schemas, assistant
messages with `tool_calls: [{"id", "type": "function", "function": {"name", "arguments"}}]`
(`arguments` a JSON string, as the OpenAI API returns it), and `{"role": "tool", "tool_call_id",
"name", "content"}` results.

Two ways to render it:

native    the tokenizer's own chat template renders `tools=` and `tool_calls` (Qwen2.5, Llama 3.1,
          Hermes...). `supports_native_tools` finds out by rendering a probe conversation and
          checking that the tool schema, the call's argument and the result all appear: a
          template that silently drops them (most do: they only print `message['content']`)
          must not be used, or the model would be trained on empty assistant turns.
fallback  a plain chat any template renders (the Hermes / Qwen2.5 text convention):
          - the tool schemas go into the system message, one JSON object per line inside
            <tools></tools>, with how to call them (merged after an existing system message);
          - an assistant call is its text `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
            (one block per call, after any text the assistant wrote before the call);
          - tool results become a *user* turn `<tool_response>\\n...\\n</tool_response>` (one block
            per result; consecutive results share one turn). A user turn, not a "tool" role:
            ChatML models like SmolLM2 never saw a "tool" role, and some templates refuse one.

The tool loop (`lmdistill.skills.tool_use.run_tool_loop`) prompts with the same rendering and
`parse_tool_calls` reads both conventions back, so what a model is asked to write at generation
time is exactly what it is trained to write. Only assistant turns carry the loss (the call text
and the final answer); tool results are prompt, so the model never learns to invent them.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lmdistill.data import Message

ToolSchema = dict[str, Any]

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"

TOOLS_PREAMBLE = (
    "You can call tools. Each tool is described by a JSON schema inside <tools></tools>:\n"
    "<tools>\n{schemas}\n</tools>\n"
    "To call a tool, write a JSON object with the tool's name and arguments inside "
    "<tool_call></tool_call> tags:\n"
    '<tool_call>\n{{"name": "<tool name>", "arguments": {{<arguments>}}}}\n</tool_call>\n'
    "The result comes back inside <tool_response></tool_response> tags. When you have what you "
    "need, write the final answer without a tool call."
)


def uses_tools(messages: Sequence[Message]) -> bool:
    """Whether a conversation holds tool calls or tool results."""
    return any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def call_arguments(call: dict[str, Any]) -> Any:
    """The arguments of a stored call (`{"function": {"arguments": ...}}`) as a JSON value: a JSON
    string is parsed; anything else (a dict from a native template's convention) is returned as is.
    Raises ValueError when the string is not JSON."""
    arguments = call.get("function", {}).get("arguments", {})
    if isinstance(arguments, str):
        return json.loads(arguments) if arguments.strip() else {}
    return arguments


def call_text(name: str, arguments: Any) -> str:
    """One call in the fallback convention."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def plain_messages(
    messages: Sequence[Message], tools: Sequence[ToolSchema] | None
) -> list[Message]:
    """The fallback rendering: `messages` as an ordinary {role, content} chat (see module doc)."""
    out: list[Message] = []
    rest = list(messages)
    if tools:
        schemas = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        preamble = TOOLS_PREAMBLE.format(schemas=schemas)
        if rest and rest[0].get("role") == "system":
            preamble = f"{rest.pop(0).get('content') or ''}\n\n{preamble}".lstrip()
        out.append({"role": "system", "content": preamble})
    for message in rest:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            parts = [message["content"].strip()] if (message.get("content") or "").strip() else []
            for call in message["tool_calls"]:
                function = call.get("function", {})
                try:
                    arguments = call_arguments(call)
                except ValueError:  # keep what the model wrote: the filter drops such traces
                    arguments = function.get("arguments")
                parts.append(call_text(function.get("name", ""), arguments))
            out.append({"role": "assistant", "content": "\n".join(parts)})
        elif role == "tool":
            block = f"{TOOL_RESPONSE_OPEN}\n{message.get('content', '')}\n{TOOL_RESPONSE_CLOSE}"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
        else:
            out.append({"role": role, "content": message.get("content") or ""})
    for message in out:
        message.pop("_tool_results", None)
    return out


def native_messages(messages: Sequence[Message]) -> list[Message]:
    """`messages` as HF chat templates expect them: call arguments as objects (templates apply
    `tojson` to them), content never None."""
    out = []
    for message in messages:
        message = dict(message)
        if message.get("content") is None:
            message["content"] = ""
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                call = {**call, "function": dict(call.get("function", {}))}
                with contextlib.suppress(ValueError):  # else left as the string written
                    call["function"]["arguments"] = call_arguments(call)
                calls.append(call)
            message["tool_calls"] = calls
        out.append(message)
    return out


_PROBE_TOOL: ToolSchema = {
    "type": "function",
    "function": {
        "name": "probe_tool_q7",
        "description": "probe description z3",
        "parameters": {
            "type": "object",
            "properties": {"probe_arg": {"type": "string"}},
            "required": ["probe_arg"],
        },
    },
}
_PROBE: list[Message] = [
    {"role": "user", "content": "probe question"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_probe",
                "type": "function",
                "function": {"name": "probe_tool_q7", "arguments": '{"probe_arg": "probe_k5"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_probe", "name": "probe_tool_q7", "content": "probe_m2"},
    {"role": "assistant", "content": "probe answer"},
]
_NATIVE: dict[str, bool] = {}  # chat template text -> whether it renders tools


def supports_native_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders tool schemas, calls and results (checked on a
    probe conversation, once per template)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return False
    key = repr(template)
    if key not in _NATIVE:
        try:
            text = tokenizer.apply_chat_template(
                native_messages(_PROBE), tools=[_PROBE_TOOL], tokenize=False
            )
        except Exception:  # a template that raises on tools or tool roles cannot render them
            text = ""
        _NATIVE[key] = isinstance(text, str) and all(
            s in text for s in ("probe description z3", "probe_k5", "probe_m2", "probe answer")
        )
    return _NATIVE[key]


def render_tool_chat(
    tokenizer,
    messages: Sequence[Message],
    tools: Sequence[ToolSchema] | None,
    *,
    add_generation_prompt: bool,
) -> str:
    """The text of a tool-use conversation: natively when the template supports tools, else in
    the fallback convention."""
    if supports_native_tools(tokenizer):
        text = tokenizer.apply_chat_template(
            native_messages(messages),
            tools=list(tools) if tools else None,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    else:
        text = tokenizer.apply_chat_template(
            plain_messages(messages, tools),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    return text


# ------------------------------------------------------------------------------------ parsing
@dataclass
class ParsedReply:
    """A model's reply read as tool calls or a final answer.

    content: the text outside the calls (before the first call; the whole reply for an answer).
    calls: (name, arguments) of each well-formed call.
    errors: why each malformed call could not be read; non-empty means the reply is unusable.
    """

    content: str
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def is_call(self) -> bool:
        return bool(self.calls or self.errors)


_CALL_BLOCK = re.compile(
    re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|$)", re.DOTALL
)


def _read_call(body: str) -> tuple[str, dict[str, Any]] | str:
    """(name, arguments) from a call's JSON, or the reason it is malformed."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError as exc:
        return f"not JSON ({exc.msg})"
    if not isinstance(value, dict):
        return "not a JSON object"
    name = value.get("name")
    if not isinstance(name, str) or not name:
        return "no 'name'"
    # "parameters": Llama 3.1's convention for the same thing.
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # the OpenAI convention: arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return "'arguments' is a string that is not JSON"
    if not isinstance(arguments, dict):
        return "'arguments' is not a JSON object"
    return name, arguments


def parse_tool_calls(text: str) -> ParsedReply:
    """Read a reply: `<tool_call>{json}</tool_call>` blocks (an unterminated last block counts,
    since generation may stop at the closing tag), or a reply that is one bare JSON object with
    a "name" and "arguments"/"parameters" (Llama 3.1's native convention). Anything after a
    `<tool_response>` the model wrote itself is an invented result and is ignored."""
    text = text.split(TOOL_RESPONSE_OPEN, 1)[0]
    blocks = list(_CALL_BLOCK.finditer(text))
    if not blocks:
        stripped = text.strip()
        if stripped.startswith("{") and stripped.endswith("}"):
            read = _read_call(stripped)
            if not isinstance(read, str):
                return ParsedReply(content="", calls=[read])
        return ParsedReply(content=stripped)
    reply = ParsedReply(content=text[: blocks[0].start()].strip())
    for block in blocks:
        read = _read_call(block.group(1).strip())
        if isinstance(read, str):
            reply.errors.append(read)
        else:
            reply.calls.append(read)
    return reply
