"""Where outputs are kept, and the one rule for writing them: an output that a later stage or a
rerun trusts appears whole or not at all (issue 19). `atomic` holds the helpers."""

from lmdistill.store.atomic import (
    COMPLETE_MARKER,
    atomic_dir,
    crash_point,
    dir_state,
    is_whole_dir,
    read_jsonl_tolerant,
    write_atomic,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)

__all__ = [
    "COMPLETE_MARKER",
    "atomic_dir",
    "crash_point",
    "dir_state",
    "is_whole_dir",
    "read_jsonl_tolerant",
    "write_atomic",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]
