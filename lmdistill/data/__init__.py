"""Data: records (JSONL), chat templates, loss masks, collation, packing."""

from typing import Any

from lmdistill.data.jsonl import (
    JsonlAppender,
    encode_line,
    iter_jsonl,
    read_appended,
    write_json_atomic,
)

# One chat message, as a teacher, a task and the chat template take it: {"role": "user",
# "content": "..."}; tool calls and names pass through. The one definition in the tree.
Message = dict[str, Any]

__all__ = [
    "JsonlAppender",
    "Message",
    "encode_line",
    "iter_jsonl",
    "read_appended",
    "write_json_atomic",
]
