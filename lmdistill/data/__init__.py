"""Data: records (JSONL), chat templates, loss masks, collation, packing."""

from lmdistill.data.jsonl import (
    JsonlAppender,
    encode_line,
    iter_jsonl,
    read_appended,
    write_json_atomic,
)

__all__ = ["JsonlAppender", "encode_line", "iter_jsonl", "read_appended", "write_json_atomic"]
