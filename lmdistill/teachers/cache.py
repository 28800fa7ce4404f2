"""An offline teacher: the teacher's top-k log-probs for every training token, computed once.

Distilling from a cache costs no teacher forward per step (and no teacher memory), and the cache is
reused across runs and students. Layout of a cache dir:

    index.json                  settings, tokenizer fingerprint, data digest, completed shards
    shard-00000.offsets.npy     int64 (E + 1,): example e's rows are offsets[e]:offsets[e + 1]
    shard-00000.ids.npy         uint16 (vocab <= 65,536) or int32 (N, k): top-k token ids, best first
    shard-00000.logprobs.npy    float16 (N, k): their log-probs at T = 1

Shard s holds the examples (data records) s*E .. (s+1)*E - 1 and one row per position that has a
training target, in position order. At k = 32 a row is 32 * (2 + 2) = 128 bytes (int32 ids: 192).
Each file is a .npy read with memory mapping: a batch reads only its own rows. float16 keeps a
log-prob to ~3 significant digits (an absolute error below 0.01 down to -20, where the probability
is ~2e-9), far below what changes a distillation gradient.

Shards are written to temporary names, renamed, and only then listed in index.json (atomically),
so an interrupted `cache-logits` resumes by skipping the listed shards.

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

FORMAT = "lmdistill.topk-cache/1"
INDEX = "index.json"


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
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "teacher": teacher_name,
        "data": {"path": str(data_path), "sha256": digest, "records": records},
        "top_k": top_k,
        "vocab": vocab,
        "id_dtype": _id_dtype(vocab).name,
        "max_length": max_length,
        "examples_per_shard": examples_per_shard,
    }


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
) -> CacheReport:
    """Compute and store `teacher`'s top-k log-probs for every position with a training target in
    `data_path` (records as `lmdistill.data.sft.conversation` reads them, rendered with the
    teacher's tokenizer; `data_path` any source `lmdistill.data.records` reads, mapped by
    `fields`). Resumes: complete shards of a previous run with the same settings are kept.
    Returns what was written."""
    import time

    from lmdistill.data.sft import load_examples

    teacher.require(Capability.FULL_LOGITS, "cache-logits (it scores the data's own tokens)")
    model, tokenizer = teacher.model, teacher.tokenizer  # type: ignore[attr-defined]
    vocab = model.get_output_embeddings().weight.shape[0]
    if not 1 <= top_k <= vocab:
        raise UserError(f"--top-k must be in [1, {vocab}], got {top_k}")
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
            model, examples, shard, examples_per_shard, out, top_k, vocab, tokens_per_batch, bar
        )
        done[_shard_name(shard)] = _shard_summary(out, shard)
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
    changed = sorted(k for k, v in settings.items() if previous.get(k) != v and k != "teacher")
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
    vocab: int,
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
    arrays = {
        "offsets": offsets,
        "ids": np.zeros((total, top_k), dtype=_id_dtype(vocab)),
        "logprobs": np.zeros((total, top_k), dtype=np.float16),
    }
    for e in range(count):
        if first + e in rows:
            lo, hi = offsets[e], offsets[e + 1]
            arrays["ids"][lo:hi] = rows[first + e][0]
            arrays["logprobs"][lo:hi] = rows[first + e][1]
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
    """Top-k of log_softmax(hidden @ head.T), (N, H) -> (N, k) ids and float16 log-probs, best first."""
    ids, logprobs = [], []
    for start in range(0, hidden.shape[0], chunk):
        logits = (hidden[start : start + chunk] @ head.T).float()
        top = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
        ids.append(top.indices.to(torch.int32).cpu())
        logprobs.append(top.values.to(torch.float16).cpu())
    if not ids:
        return np.zeros((0, k), np.int32), np.zeros((0, k), np.float16)
    return torch.cat(ids).numpy(), torch.cat(logprobs).numpy()


def _shard_summary(out: Path, shard: int) -> dict[str, int]:
    base = out / _shard_name(shard)
    files = [base.with_name(f"{base.name}.{n}.npy") for n in ("offsets", "ids", "logprobs")]
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
        if self.index.get("format") != FORMAT:
            raise UserError(
                f"{self.dir}: cache format {self.index.get('format')!r}, this lmdistill reads {FORMAT}"
            )
        self.name = f"cache:{self.dir}"
        self.top_k = int(self.index["top_k"])
        self.per_shard = int(self.index["examples_per_shard"])
        self._shards: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

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
        """(ids (n, k), log-probs (n, k)) of the example's n positions with a target."""
        shard, local = divmod(example.index, self.per_shard)
        if shard not in self._shards:
            base = self.dir / _shard_name(shard)
            self._shards[shard] = tuple(
                np.load(base.with_name(f"{base.name}.{n}.npy"), mmap_mode="r")
                for n in ("offsets", "ids", "logprobs")
            )
        offsets, ids, logprobs = self._shards[shard]
        lo, hi = int(offsets[local]), int(offsets[local + 1])
        return ids[lo:hi], logprobs[lo:hi]

    def iter_generate(
        self, conversations: Sequence[list[Message]], params: SamplingParams
    ) -> Iterator[GenerationResult]:
        self.require(Capability.TEXT, "generation")
        return iter(())
