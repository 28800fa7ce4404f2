"""A local OpenAI-compatible teacher that calls tools, well and badly, for the tool-use recipe.

It answers the `tool_use` task's questions in the fallback text convention the tool loop prompts
an API teacher with (`lmdistill.data.tool_format`): a `<tool_call>` block on the question's turn,
and "Answer: <the tool's result>" once the `<tool_response>` comes back. What it does with a
question is fixed by the question's place in the task's examples (`ToolCaller.behaviour`), so a
test knows, for every trace, what the filter and the tool metrics must make of it:

  ok          the expected call, then the tool's result as the answer
  unparseable a call whose JSON does not parse (the trace ends there: "unparseable_call")
  bad_args    the expected tool with an argument its schema does not have (the tool refuses it)
  wrong       the expected call, then a wrong final answer

It runs on `FaultServer` (tests/faultserver.py), so faults and request counts come with it:

    with tool_server() as server:   # server.base_url, server.plan.reply.seen
        ...
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from faultserver import FaultPlan, FaultServer

from lmdistill.data.tool_format import TOOL_RESPONSE_CLOSE, TOOL_RESPONSE_OPEN, call_text
from lmdistill.tasks.tool_use import ToolUseTask

BEHAVIOURS = ("ok", "unparseable", "bad_args", "wrong")
# What `lmdistill.skills.tool_use.filter_tool_traces` (with the task) drops each behaviour for.
DROPPED_AS = {
    "unparseable": "unparseable",
    "bad_args": "unexpected_argument",
    "wrong": "wrong_answer",
}


class ToolCaller:
    """The reply to a conversation (FaultPlan.reply). Knows the task's first `size` examples of
    each split (with seed 0, as recipes draw them: a smaller limit takes a prefix)."""

    def __init__(self, size: int = 300) -> None:
        task = ToolUseTask()
        self.examples = {}
        for split in ("train", "test"):
            for i, example in enumerate(task.examples(split=split, limit=size, seed=0)):
                self.examples[example.metadata["question"]] = (i, example)
        self.seen: Counter[str] = Counter()  # behaviour -> questions asked (first turns)

    def behaviour(self, question: str) -> str:
        return BEHAVIOURS[self.examples[question][0] % len(BEHAVIOURS)]

    def __call__(self, messages: list[dict[str, Any]]) -> str:
        user = next(m for m in messages if m.get("role") == "user")
        question = str(user.get("content", "")).split("\n", 1)[0]
        if question not in self.examples:
            return "I can only answer the tool_use task's questions."
        behaviour = self.behaviour(question)
        call = self.examples[question][1].metadata["expected_call"]
        last = str(messages[-1].get("content", ""))
        if messages[-1].get("role") == "user" and last.startswith(TOOL_RESPONSE_OPEN):
            result = last.removeprefix(TOOL_RESPONSE_OPEN).split(TOOL_RESPONSE_CLOSE)[0].strip()
            if behaviour == "wrong":
                return "The tool was no help here.\nAnswer: 7"
            return f"The tool says {result}.\nAnswer: {result}"
        self.seen[behaviour] += 1
        if behaviour == "unparseable":
            body = json.dumps({"name": call["name"], "arguments": call["arguments"]})
            return f"<tool_call>\n{body[:-3]}\n</tool_call>"  # cut short: not JSON
        if behaviour == "bad_args":
            return call_text(call["name"], {**call["arguments"], "precision": 3})
        return call_text(call["name"], call["arguments"])


def tool_server(**plan: Any) -> FaultServer:
    """A FaultServer whose answers come from a ToolCaller (plan: more FaultPlan fields)."""
    return FaultServer(FaultPlan(reply=ToolCaller(), **plan))
