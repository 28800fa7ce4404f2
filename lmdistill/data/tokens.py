"""Tokenized data on disk: a data source is tokenized once, streamed into flat memory-mapped arrays,
and read back from them by every later run (issue 13, item 3).

Why: holding every tokenized example in Python lists costs ~100 bytes per token and grows with the
data; a million examples did not fit beside a model. Here tokenization writes each example as it
comes (a few thousand examples are buffered at a time), and a run reads only the examples its
batches touch, so a process's memory does not grow with the dataset (beyond 8-16 bytes per
example for offsets and lengths). Mapped pages are the OS's page cache: reclaimable, shared
between processes reading the same cache.

Layout of one cache dir (`<root>/<key>/`, built by `atomic_dir`, so it is whole or absent):

    meta.json        what it was made from (the key's inputs) and its counts
    offsets.i64      (E + 1,) example e's tokens are [offsets[e], offsets[e + 1])
    records.i64      (E,) the record index of example e (its place in the source)
    input_ids.i32    (N,) token ids, all examples one after another
    targets.i32      (N,) aligned next-token targets (-100: no loss), as `Example.targets`
    weighted.u8      (E,) only with span weights: 1 when example e has per-position weights
    weights.f64      (N,) only with span weights: the weights (1 where an example has none)

The key hashes everything that decides the ids: the tokenizer's full definition (vocabulary,
merges, normalizer, pre-tokenizer, special tokens) and chat template, the transformers and
tokenizers versions (they render templates and split text), the source's digest
(`records.source_digest`, with its field mapping), max_length, the split filter, the span weights
and this module's FORMAT (bumped whenever rendering or masking changes). A changed input gets a
new dir; old dirs are never read again and can be deleted at any time.

Where: `$LMDISTILL_TOKEN_CACHE`, else `$LMDISTILL_CACHE_DIR/tokens`, else the user cache dir's
`lmdistill/tokens`. Concurrent builders of one key (the processes of a multi-process run, or two
runs) take a file lock: one tokenizes, the others wait for it and read its result. On several
machines, point `$LMDISTILL_TOKEN_CACHE` at a shared dir or each machine tokenizes once.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmdistill.errors import UserError
from lmdistill.store.atomic import atomic_dir, is_whole_dir

FORMAT = "lmdistill.tokens/1"
TOKEN_CACHE_ENV = "LMDISTILL_TOKEN_CACHE"
META = "meta.json"
_DTYPES = {
    "offsets": np.int64,
    "records": np.int64,
    "input_ids": np.int32,
    "targets": np.int32,
    "weighted": np.uint8,
    "weights": np.float64,
}
_SUFFIX = {"offsets": "i64", "records": "i64", "input_ids": "i32", "targets": "i32"}
_SUFFIX |= {"weighted": "u8", "weights": "f64"}


def token_cache_root() -> Path:
    if os.environ.get(TOKEN_CACHE_ENV):
        return Path(os.environ[TOKEN_CACHE_ENV]).expanduser()
    if os.environ.get("LMDISTILL_CACHE_DIR"):  # where the bundled teachers are converted
        return Path(os.environ["LMDISTILL_CACHE_DIR"]).expanduser() / "tokens"
    import platformdirs

    return Path(platformdirs.user_cache_dir("lmdistill")) / "tokens"


def tokenization_fingerprint(tokenizer) -> str:
    """sha256 of everything in a tokenizer that turns a conversation into ids: its whole Rust
    definition (vocabulary, merges, normalizer, pre-tokenizer, added tokens), its chat template and
    the library versions that render and split. Stricter than the teacher cache's fingerprint
    (`teachers.cache.tokenizer_fingerprint`, vocabulary and template only), because this cache
    stores the ids themselves."""
    import tokenizers
    import transformers

    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("training needs a fast (Rust) tokenizer: it maps tokens to characters")
    for part in (
        backend.to_str(),
        str(getattr(tokenizer, "chat_template", None)),
        type(tokenizer).__name__,
        transformers.__version__,
        tokenizers.__version__,
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def cache_key(settings: dict[str, Any]) -> str:
    blob = json.dumps({"format": FORMAT, **settings}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


class TokenWriter:
    """Appends examples to the files of a cache dir being built, a buffer at a time."""

    def __init__(self, directory: Path, *, weighted: bool, buffer_examples: int = 4096) -> None:
        self.dir = directory
        names = ["records", "input_ids", "targets"] + (["weighted", "weights"] if weighted else [])
        self.handles = {n: (directory / f"{n}.{_SUFFIX[n]}").open("wb") for n in names}
        self.buffers: dict[str, list] = {n: [] for n in names}
        self.offsets = array("q", [0])  # kept whole: 8 bytes per example
        self.buffer_examples = buffer_examples
        self.tokens = 0

    def append(
        self, record: int, input_ids: Sequence[int], targets: Sequence[int], weights=None
    ) -> None:
        self.buffers["records"].append(record)
        self.buffers["input_ids"].extend(input_ids)
        self.buffers["targets"].extend(targets)
        if "weights" in self.buffers:
            self.buffers["weighted"].append(0 if weights is None else 1)
            self.buffers["weights"].extend([1.0] * len(input_ids) if weights is None else weights)
        self.tokens += len(input_ids)
        self.offsets.append(self.tokens)
        if len(self.buffers["records"]) >= self.buffer_examples:
            self.flush()

    def flush(self) -> None:
        for name, values in self.buffers.items():
            self.handles[name].write(np.asarray(values, dtype=_DTYPES[name]).tobytes())
            values.clear()

    def abort(self) -> None:
        for handle in self.handles.values():
            handle.close()

    def close(self, meta: dict[str, Any]) -> None:
        self.flush()
        for handle in self.handles.values():
            handle.close()
        offsets = np.frombuffer(self.offsets, dtype=np.int64)
        offsets.tofile(self.dir / f"offsets.{_SUFFIX['offsets']}")
        examples = len(offsets) - 1
        meta = {**meta, "format": FORMAT, "examples": examples, "tokens": self.tokens}
        (self.dir / META).write_text(json.dumps(meta, indent=2, default=str))


class TokenArrays:
    """The arrays of a whole cache dir, memory-mapped read-only."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.meta = json.loads((directory / META).read_text())
        self.arrays: dict[str, np.ndarray] = {}
        for name, dtype in _DTYPES.items():
            path = directory / f"{name}.{_SUFFIX[name]}"
            if not path.is_file():
                continue
            # mmap cannot map an empty file; an empty array reads the same.
            size = path.stat().st_size
            self.arrays[name] = (
                np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
            )

    def __getattr__(self, name: str) -> np.ndarray:
        arrays = self.__dict__.get("arrays", {})
        if name in arrays:
            return arrays[name]
        if name in _DTYPES:
            return None  # an optional array this cache does not have
        raise AttributeError(name)


def open_or_build(settings: dict[str, Any], build, *, root: Path | None = None) -> TokenArrays:
    """The cache dir of `settings`, built by `build(writer) -> meta` when it is not there yet.

    One builder per key at a time (a file lock); the dir appears whole or not at all."""
    from filelock import FileLock

    root = token_cache_root() if root is None else root
    final = root / cache_key(settings)
    if not is_whole_dir(final):
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{root}: cannot create the token cache ({exc.strerror})") from None
        with FileLock(str(final) + ".lock"):
            if not is_whole_dir(final):  # another process may have built it meanwhile
                with atomic_dir(final) as tmp:
                    writer = TokenWriter(tmp, weighted=bool(settings.get("span_weights")))
                    try:
                        meta = build(writer)
                    except BaseException:
                        writer.abort()  # atomic_dir then removes the partial dir
                        raise
                    writer.close({**meta, "settings": settings})
    return TokenArrays(final)
