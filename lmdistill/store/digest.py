"""Content digests: what identifies a file's bytes, for caches and fingerprints that must notice
when an input changed and nothing else. Imports nothing from lmdistill but `errors`."""

from __future__ import annotations

import hashlib
from pathlib import Path

from lmdistill.errors import UserError

_BLOCK = 1 << 20  # read 1 MiB at a time: a large data file is never held whole


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, hex. A missing file is a one-line UserError naming it."""
    digest = hashlib.sha256()
    try:
        with Path(path).open("rb") as handle:
            while block := handle.read(_BLOCK):
                digest.update(block)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    return digest.hexdigest()
