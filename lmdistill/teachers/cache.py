"""An offline teacher: the teacher's top-k log-probs for every training token, computed once.

Distilling from a cache costs no teacher forward per step (and no teacher memory), and the cache is
reused across runs and students. Two layouts; both are read, the compact one is written unless
`exact=True` (`cache-logits --exact`):

Compact (format 2, the default since issue #20). Per shard:

    shard-00000.offsets.npy     int64 (E + 1,): example e's rows are offsets[e]:offsets[e + 1]
    shard-00000.entries.npy     int64 (E + 1,): its kept (id, log-prob) entries, likewise
    shard-00000.counts.npy      uint8/16/32 (N,): k of each row (1 <= k <= top_k)
    shard-00000.top1.npy        float16 (N,): the row's top-1 log-prob at T = 1
    shard-00000.ids.npy         uint8: the kept ids, best first, bit-packed at ceil(log2 V) bits
                                each (16 for SmolLM2's 49,152, 17 for Llama-3's 128,256)
    shard-00000.codes.npy       uint8 (entries,): round((top1 - logprob) / step), step = 1/16 nat

A row keeps the fewest top tokens whose probabilities sum to `mass` (0.96 by default), at most
top_k, and never one more than 255 steps (15.9 nats, a probability below 1.2e-7 of the top-1's)
under the top-1. A kept log-prob is off by at most step / 2 = 1/32 nat from the teacher's float32
value relative to the top-1 (a probability off by at most 3.2%, relative) plus float16's rounding
of the top-1 (the same shift for the whole row, which the sparse loss's renormalisation removes).
A row then costs 2 + 1 + k * (bits / 8 + 1) bytes: at the quickstart's top-32, mass 0.96 and
SmolLM2's vocabulary, ~16 entries and ~51 bytes per token against 128 for the exact layout.
`lookup` gives (n, top_k) arrays with the missing entries as log-prob -inf (id 0), which is how the
sparse loss marks padding: it renormalises over the kept tokens.

Exact (format 1: what lmdistill wrote before issue #20). Per shard offsets.npy as above,
ids.npy uint16 (vocab <= 65,536) or int32 (N, k) and logprobs.npy float16 (N, k), every row k
entries: 32 * (2 + 2) = 128 bytes per token at k = 32 (int32 ids: 192). float16 keeps a log-prob
to ~3 significant digits.

Each file is a .npy read with memory mapping: a batch reads only its own rows. Shard s holds the
examples (data records) s*E .. (s+1)*E - 1 and one row per position that has a training target,
in position order. Shards are written to temporary names, renamed, and only then listed in
index.json (atomically), so an interrupted `cache-logits` resumes by skipping the listed shards.

The tokenizer's fingerprint (vocabulary, special tokens, chat template) is stored: the rows are
positions of the data as that tokenizer renders it, so training refuses a cache made with another.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmdistill.data.jsonl import write_json_atomic
from lmdistill.data.records import FieldMap, source_digest
from lmdistill.data.sft import Example, collate, epoch_plan
from lmdistill.errors import UserError
from lmdistill.teachers.base import Capability, GenerationResult, Message, SamplingParams, Teacher

FORMAT = "lmdistill.topk-cache/2"  # compact: bit-packed ids, 8-bit log-probs, k per row
EXACT_FORMAT = "lmdistill.topk-cache/1"  # fixed k, float16 log-probs (before issue #20)
INDEX = "index.json"
DEFAULT_MASS = 0.96
# Quantization step of a log-prob below its row's top-1, in nats: 8-bit codes reach 255 steps.
LOGPROB_STEP = 1.0 / 16
_MAX_CODE = 255
_FILES = {
    FORMAT: ("offsets", "entries", "counts", "top1", "ids", "codes"),
    EXACT_FORMAT: ("offsets", "ids", "logprobs"),
}


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the vocabulary, the special/added tokens and the chat template: two tokenizers
    with the same fingerprint turn the same conversation into the same ids."""
    added = {
        str(i): str(t) for i, t in sorted(getattr(tokenizer, "added_tokens_decoder", {}).items())
    }
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
        "special": sorted(map(str, tokenizer.all_special_tokens)),
        "added": added,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def _shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def _id_dtype(vocab: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab <= 2**16 else np.dtype(np.int32)


def id_bits(vocab: int) -> int:
    """Bits that hold every id of a `vocab`-token vocabulary."""
    return max(1, (vocab - 1).bit_length())


def _count_dtype(top_k: int) -> np.dtype:
    return np.dtype(np.uint8 if top_k < 2**8 else np.uint16 if top_k < 2**16 else np.uint32)


# ------------------------------------------------------------------------------- bit packing
_PACK_CHUNK = 1 << 20  # entries per packing step (a multiple of 8: whole bytes per step)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Non-negative integers (m,) < 2**bits, each stored in `bits` bits, little-endian, as uint8."""
    values = np.asarray(values, dtype=np.uint64).reshape(-1)
    if values.size and int(values.max()) >> bits:
        raise ValueError(f"a value does not fit in {bits} bits")
    shifts = np.arange(bits, dtype=np.uint64)
    parts = [
        np.packbits(
            ((values[i : i + _PACK_CHUNK, None] >> shifts) & 1).astype(np.uint8).reshape(-1),
            bitorder="little",
        )
        for i in range(0, values.size, _PACK_CHUNK)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def unpack_bits(packed: np.ndarray, bits: int, start: int, count: int) -> np.ndarray:
    """Values start .. start + count - 1 of a `pack_bits` array, as int64 (reads only their bytes)."""
    first, last = start * bits, (start + count) * bits
    window = np.unpackbits(np.asarray(packed[first // 8 : -(-last // 8)]), bitorder="little")
    skip = first % 8
    table = window[skip : skip + count * bits].reshape(count, bits).astype(np.int64)
    return table @ (np.int64(1) << np.arange(bits, dtype=np.int64))


# -------------------------------------------------------------------------- compact rows
@dataclass
class CompactRows:
    """Rows of the compact layout (see the module docstring), before the ids are bit-packed."""

    counts: np.ndarray  # (n,) k of each row
    top1: np.ndarray  # (n,) float16
    ids: np.ndarray  # (entries,) int64, row after row, best first
    codes: np.ndarray  # (entries,) uint8


def compact_rows(ids: np.ndarray, logprobs: np.ndarray, mass: float) -> CompactRows:
    """Keep each row's fewest top entries whose probabilities sum to `mass` (all k at mass 1),
    none deeper than 255 steps under its top-1; quantize their log-probs relative to the top-1.
    ids, logprobs: (n, k), best first, log-probs in float32 (or wider) at T = 1."""
    logprobs = np.asarray(logprobs, dtype=np.float64)
    n, k = logprobs.shape
    below_top = logprobs[:, :1] - logprobs  # >= 0, nondecreasing along a row
    codes = np.rint(below_top / LOGPROB_STEP)
    in_range = (codes <= _MAX_CODE).sum(axis=1)
    if mass >= 1.0:
        covered = np.full(n, k)
    else:  # entries before the one that reaches `mass`, plus that one
        covered = (np.cumsum(np.exp(logprobs), axis=1) < mass).sum(axis=1) + 1
    counts = np.minimum(np.minimum(covered, in_range), k).astype(_count_dtype(k))
    keep = np.arange(k) < counts[:, None].astype(np.int64)
    return CompactRows(
        counts=counts,
        top1=logprobs[:, 0].astype(np.float16) if n else np.zeros(0, np.float16),
        ids=np.asarray(ids, dtype=np.int64)[keep],
        codes=codes[keep].astype(np.uint8),
    )


def expand_rows(
    counts: np.ndarray, top1: np.ndarray, ids: np.ndarray, codes: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """(n, width) int32 ids and float32 log-probs of compact rows; missing entries get id 0 and
    log-prob -inf (the sparse loss's padding)."""
    counts = np.asarray(counts, dtype=np.int64)
    out_ids = np.zeros((counts.size, width), dtype=np.int32)
    out_logprobs = np.full((counts.size, width), -np.inf, dtype=np.float32)
    keep = np.arange(width) < counts[:, None]
    out_ids[keep] = ids
    out_logprobs[keep] = np.repeat(np.asarray(top1, np.float32), counts) - (
        np.asarray(codes, np.float32) * np.float32(LOGPROB_STEP)
    )
    return out_ids, out_logprobs


@dataclass
class CacheReport:
    out_dir: str
    shards: int
    shards_skipped: int  # already complete from an earlier run
    positions: int  # rows (positions with a target) in the whole cache
    bytes: int  # of the shard files
    seconds: float

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.positions, 1)


def _settings(
    fingerprint: str,
    teacher_name: str,
    data_path: str,
    digest: str,
    top_k: int,
    vocab: int,
    max_length: int,
    examples_per_shard: int,
    records: int,
    mass: float | None,
) -> dict[str, Any]:
    """index.json's settings; `mass` None: the exact layout (the keys it has always had)."""
    settings: dict[str, Any] = {
        "format": EXACT_FORMAT if mass is None else FORMAT,
        "fingerprint": fingerprint,
        "teacher": teacher_name,
        "data": {"path": str(data_path), "sha256": digest, "records": records},
        "top_k": top_k,
        "vocab": vocab,
        "id_dtype": _id_dtype(vocab).name,
        "max_length": max_length,
        "examples_per_shard": examples_per_shard,
    }
    if mass is not None:
        del settings["id_dtype"]
        settings.update(id_bits=id_bits(vocab), mass=mass, logprob_step=LOGPROB_STEP)
    return settings


def build_cache(
    teacher: Teacher,
    data_path: str | Path,
    out_dir: str | Path,
    *,
    top_k: int = 32,
    max_length: int = 1024,
    examples_per_shard: int = 2048,
    tokens_per_batch: int = 8192,
    progress: bool = True,
    fields: FieldMap | None = None,
    mass: float | None = None,
    exact: bool = False,
) -> CacheReport:
    """Compute and store `teacher`'s top-k log-probs for every position with a training target in
    `data_path` (records as `lmdistill.data.sft.conversation` reads them, rendered with the
    teacher's tokenizer; `data_path` any source `lmdistill.data.records` reads, mapped by
    `fields`). Resumes: complete shards of a previous run with the same settings are kept.

    The compact layout (module docstring) keeps per row the fewest of the top_k tokens whose
    probabilities sum to `mass` (default DEFAULT_MASS; 1: all top_k); `exact=True` writes the
    exact layout (every row top_k float16 log-probs), which takes no `mass`.
    Returns what was written."""
    import time

    from lmdistill.data.sft import load_examples

    teacher.require(Capability.FULL_LOGITS, "cache-logits (it scores the data's own tokens)")
    model, tokenizer = teacher.model, teacher.tokenizer  # type: ignore[attr-defined]
    vocab = model.get_output_embeddings().weight.shape[0]
    if not 1 <= top_k <= vocab:
        raise UserError(f"--top-k must be in [1, {vocab}], got {top_k}")
    if exact and mass is not None:
        raise UserError("--mass applies to the compact layout; --exact keeps all top-k entries")
    if not exact:
        mass = DEFAULT_MASS if mass is None else float(mass)
        if not 0.0 < mass <= 1.0:
            raise UserError(f"--mass must be in (0, 1], got {mass}")
    if examples_per_shard < 1:
        raise UserError(f"examples per shard must be >= 1, got {examples_per_shard}")
    if tokens_per_batch < max_length:
        raise UserError(
            f"tokens per batch ({tokens_per_batch}) must hold one example (max_length {max_length})"
        )
    data_path, out = str(Path(data_path)), Path(out_dir)  # as earlier versions recorded it
    started = time.perf_counter()
    # Tokenized as training tokenizes it (the same function and token cache), by record index:
    # examples[r] is record r's example, None when max_length leaves it no target.
    examples = load_examples(
        data_path, tokenizer, max_length=max_length, fields=fields, require=False
    ).examples.by_record()
    settings = _settings(
        tokenizer_fingerprint(tokenizer),
        teacher.name,
        data_path,
        source_digest(data_path, fields),
        top_k,
        vocab,
        max_length,
        examples_per_shard,
        len(examples),
        mass,
    )
    done = _resume_point(out, settings)
    shards = max(1, -(-len(examples) // examples_per_shard))
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / INDEX, {**settings, "shards": done})
    todo = [s for s in range(shards) if _shard_name(s) not in done]
    bar = _progress(
        sum(len(e) for s in todo for e in _shard(examples, s, examples_per_shard) if e), progress
    )
    for shard in todo:
        _write_shard(
            model, examples, shard, examples_per_shard, out, top_k, settings, tokens_per_batch, bar
        )
        done[_shard_name(shard)] = _shard_summary(out, shard, settings["format"])
        write_json_atomic(out / INDEX, {**settings, "shards": done})
    bar.close()
    positions = sum(s["positions"] for s in done.values())
    size = sum(s["bytes"] for s in done.values())
    return CacheReport(
        str(out), shards, shards - len(todo), positions, size, time.perf_counter() - started
    )


def _progress(total_tokens: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total_tokens, unit="tok", disable=not enabled, desc="cache-logits", dynamic_ncols=True
    )


def _resume_point(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The completed shards of an earlier run into `out`, after checking it used the same settings."""
    index_path = out / INDEX
    if not index_path.is_file():
        if out.exists() and any(out.iterdir()):
            raise UserError(
                f"{out} exists and is not a teacher cache; choose an empty or new --out"
            )
        return {}
    previous = json.loads(index_path.read_text())
    keys = set(settings) | set(previous)
    changed = sorted(
        k for k in keys if previous.get(k) != settings.get(k) and k not in ("teacher", "shards")
    )
    if changed:
        raise UserError(
            f"{out} holds a cache made with other settings ({', '.join(changed)} differ); "
            "use another --out, or delete it to start over"
        )
    return dict(previous.get("shards", {}))


def _shard(
    examples: Sequence[Example | None], shard: int, per_shard: int
) -> Sequence[Example | None]:
    return examples[shard * per_shard : (shard + 1) * per_shard]


@torch.no_grad()
def _write_shard(
    model,
    examples,
    shard: int,
    per_shard: int,
    out: Path,
    top_k: int,
    settings: dict[str, Any],
    tokens_per_batch: int,
    bar,
) -> None:
    members = [e for e in _shard(examples, shard, per_shard) if e is not None]
    rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for ids, logprobs, example_rows in _teacher_topk(model, members, top_k, tokens_per_batch):
        for index, (lo, hi) in example_rows.items():
            rows[index] = (ids[lo:hi], logprobs[lo:hi])
        bar.update(sum(len(examples[i]) for i in example_rows))
    first = shard * per_shard
    count = len(_shard(examples, shard, per_shard))
    sizes = [len(rows[first + e][0]) if first + e in rows else 0 for e in range(count)]
    offsets = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    total = int(offsets[-1])
    base = out / _shard_name(shard)
    ordered = [rows[first + e] for e in range(count) if first + e in rows]
    ids = np.concatenate([r[0] for r in ordered]) if ordered else np.zeros((0, top_k), np.int32)
    logprobs = (
        np.concatenate([r[1] for r in ordered]) if ordered else np.zeros((0, top_k), np.float32)
    )
    assert len(ids) == total
    if settings["format"] == EXACT_FORMAT:
        arrays = {
            "offsets": offsets,
            "ids": ids.astype(settings["id_dtype"]),
            "logprobs": logprobs.astype(np.float16),
        }
    else:
        compact = compact_rows(ids, logprobs, settings["mass"])
        row_entries = np.zeros(total + 1, dtype=np.int64)
        np.cumsum(compact.counts, out=row_entries[1:])
        arrays = {
            "offsets": offsets,
            "entries": row_entries[offsets],
            "counts": compact.counts,
            "top1": compact.top1,
            "ids": pack_bits(compact.ids, settings["id_bits"]),
            "codes": compact.codes,
        }
    for name, array in arrays.items():
        tmp = base.with_name(f".{base.name}.{name}.tmp.npy")
        np.save(tmp, array)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, base.with_name(f"{base.name}.{name}.npy"))


def _teacher_topk(
    model, members: Sequence[Example], top_k: int, tokens_per_batch: int
) -> Iterator[tuple[np.ndarray, np.ndarray, dict[int, tuple[int, int]]]]:
    """Per packed batch: (ids (n, k), log-probs (n, k), example index -> its row range)."""
    from lmdistill.teachers.forward import forward_signals

    device = next(model.parameters()).device
    lengths = [len(e) for e in members]
    max_length = max(lengths, default=1)
    plan = epoch_plan(
        lengths,
        seed=0,
        epoch=0,
        row_length=max_length,
        tokens_per_batch=max(tokens_per_batch, max_length),
        shuffle=False,
    )
    for micro_batch in plan:
        batch = collate(members, micro_batch, pad_id=0).to(device)
        signals = forward_signals(model, batch)
        keep = (batch.targets != -100).reshape(-1)
        hidden = signals.hidden.reshape(-1, signals.hidden.shape[-1])[keep]
        ids, logprobs = _topk_chunked(hidden, signals.head, top_k)
        # Rows come out in (row, position) order, which is each example's position order.
        example_rows, start = {}, 0
        for row in micro_batch:
            for i in row:
                n = members[i].loss_tokens
                example_rows[members[i].index] = (start, start + n)
                start += n
        yield ids, logprobs, example_rows


def _topk_chunked(
    hidden: torch.Tensor, head: torch.Tensor, k: int, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of log_softmax(hidden @ head.T), (N, H) -> (N, k) int32 ids and float32 log-probs,
    best first."""
    ids, logprobs = [], []
    for start in range(0, hidden.shape[0], chunk):
        logits = (hidden[start : start + chunk] @ head.T).float()
        top = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
        ids.append(top.indices.to(torch.int32).cpu())
        logprobs.append(top.values.cpu())
    if not ids:
        return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32)
    return torch.cat(ids).numpy(), torch.cat(logprobs).numpy()


def _shard_summary(out: Path, shard: int, layout: str) -> dict[str, int]:
    base = out / _shard_name(shard)
    files = [base.with_name(f"{base.name}.{n}.npy") for n in _FILES[layout]]
    offsets = np.load(files[0])
    return {"positions": int(offsets[-1]), "bytes": sum(f.stat().st_size for f in files)}


class TopkCache(Teacher):
    """A teacher read from a cache dir: top-k log-probs of given data, nothing else (no text, no
    full logits). `lookup(example)` gives an example's rows; shards are memory-mapped on first use."""

    capabilities = Capability.TOPK_LOGPROBS

    def __init__(self, cache_dir: str | Path) -> None:
        self.dir = Path(cache_dir)
        index_path = self.dir / INDEX
        if not index_path.is_file():
            raise UserError(
                f"{self.dir} is not a teacher cache (no {INDEX}); make one with lmdistill cache-logits"
            )
        self.index = json.loads(index_path.read_text())
        self.format = self.index.get("format")
        if self.format not in _FILES:
            teacher, data = self.index.get("teacher", "TEACHER"), self.index.get("data", {})
            raise UserError(
                f"{self.dir}: teacher cache format {self.format!r}, this lmdistill reads "
                f"{' and '.join(sorted(_FILES))}; rebuild it: lmdistill cache-logits --teacher "
                f"{teacher} --data {data.get('path', 'DATA')} --out NEW_DIR"
            )
        self.name = f"cache:{self.dir}"
        self.top_k = int(self.index["top_k"])
        self.per_shard = int(self.index["examples_per_shard"])
        self._shards: dict[int, dict[str, np.ndarray]] = {}

    def check_compatible(
        self,
        tokenizer,
        data_path: str | Path,
        max_length: int,
        fields: FieldMap | None = None,
    ) -> None:
        """Refuse a cache made with another tokenizer, other data or another max_length, with a
        message saying which, and a cache that is not complete."""
        if tokenizer_fingerprint(tokenizer) != self.index["fingerprint"]:
            raise UserError(
                f"teacher cache {self.dir} was made with another tokenizer (vocabulary, special "
                "tokens or chat template differ from the student's); its token ids and positions "
                "do not apply. Rebuild it with the student's tokenizer family"
            )
        if source_digest(data_path, fields) != self.index["data"]["sha256"]:
            raise UserError(
                f"teacher cache {self.dir} was made from other data than {data_path} (its content differs)"
            )
        if max_length != self.index["max_length"]:
            raise UserError(
                f"teacher cache {self.dir} was made with max_length {self.index['max_length']}, "
                f"training uses {max_length}"
            )
        records = int(self.index["data"]["records"])
        missing = [
            s
            for s in range(max(1, -(-records // self.per_shard)))
            if _shard_name(s) not in self.index["shards"]
        ]
        if missing:
            raise UserError(
                f"teacher cache {self.dir} is incomplete ({len(missing)} shards missing); rerun cache-logits to finish it"
            )

    def lookup(self, example: Example) -> tuple[np.ndarray, np.ndarray]:
        """(ids (n, top_k), log-probs (n, top_k)) of the example's n positions with a target;
        entries a compact cache did not keep have log-prob -inf."""
        shard, local = divmod(example.index, self.per_shard)
        if shard not in self._shards:
            base = self.dir / _shard_name(shard)
            self._shards[shard] = {
                n: np.load(base.with_name(f"{base.name}.{n}.npy"), mmap_mode="r")
                for n in _FILES[self.format]
            }
        files = self._shards[shard]
        lo, hi = int(files["offsets"][local]), int(files["offsets"][local + 1])
        if self.format == EXACT_FORMAT:
            return files["ids"][lo:hi], files["logprobs"][lo:hi]
        start, stop = int(files["entries"][local]), int(files["entries"][local + 1])
        return expand_rows(
            files["counts"][lo:hi],
            files["top1"][lo:hi],
            unpack_bits(files["ids"], int(self.index["id_bits"]), start, stop - start),
            files["codes"][start:stop],
            self.top_k,
        )

    def iter_generate(
        self, conversations: Sequence[list[Message]], params: SamplingParams
    ) -> Iterator[GenerationResult]:
        self.require(Capability.TEXT, "generation")
        return iter(())
