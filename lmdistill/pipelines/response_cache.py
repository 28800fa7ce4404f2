"""A persistent cache of teacher responses, so that an identical request is never paid for twice:
not in a rerun, not for another output file, not by a second process running at the same time.

One SQLite file in WAL mode (readers never block the writer; several processes may write, each
waiting on SQLite's lock for up to `timeout_s`). A response is keyed by a hash of everything that
determines it: the teacher (`Teacher.cache_identity()`: model and endpoint), the exact messages, the sampling parameters and
the sample index, which tells apart the n samples of one prompt."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sqlite3
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from lmdistill.errors import UserError
from lmdistill.teachers.base import Generation, Message, SamplingParams

CACHE_ENV = "LMDISTILL_RESPONSE_CACHE"
_KEY_VERSION = 1  # bump when the key's contents change, so old entries stop matching


def default_cache_path() -> Path:
    """`$LMDISTILL_RESPONSE_CACHE`, else `responses.sqlite3` in lmdistill's cache dir."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    from lmdistill.teachers.bundled import cache_root

    return cache_root() / "responses.sqlite3"


def request_key(
    teacher_identity: str, messages: Sequence[Message], params: SamplingParams, sample: int
) -> str:
    """A hash of one sample's request. `n` is left out on purpose: sample 2 of an n=4 run is the
    same request as sample 2 of an n=8 run."""
    request = {
        "v": _KEY_VERSION,
        "teacher": teacher_identity,
        "messages": list(messages),
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_tokens,
        "seed": params.seed,
        "top_logprobs": params.top_logprobs,
        "sample": sample,
    }
    canonical = json.dumps(request, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


class ResponseCache:
    """Generations by request key, in SQLite. Use from one thread (open one per process)."""

    def __init__(self, path: str | Path, *, timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        self._write_failed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit: each put is its own short transaction, so a crash loses nothing stored.
            self._db = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable across a process crash in WAL mode (an OS crash may lose the last
            # commits, which only means paying for those requests again).
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS responses ("
                " key TEXT PRIMARY KEY, generation TEXT NOT NULL, created REAL NOT NULL)"
            )
        except (OSError, sqlite3.Error) as exc:
            raise UserError(
                f"cannot open the response cache {self.path} ({exc}); "
                "choose another with --cache or turn it off with --no-cache"
            ) from None

    def get_many(self, keys: Iterable[str]) -> dict[str, Generation]:
        """The cached generations among `keys`."""
        keys = list(keys)
        found: dict[str, Generation] = {}
        chunk = 500  # SQLite limits the number of bound parameters per statement
        for start in range(0, len(keys), chunk):
            part = keys[start : start + chunk]
            marks = ",".join("?" * len(part))
            rows = self._db.execute(
                f"SELECT key, generation FROM responses WHERE key IN ({marks})", part
            )
            for key, payload in rows:
                found[key] = _generation_from_json(payload)
        return found

    def put_many(self, items: Sequence[tuple[str, Generation]]) -> None:
        """Store generations. A cache that cannot be written (disk full, locked for longer than
        the timeout) must not stop a run whose output is still being saved: warn once, go on."""
        if not items or self._write_failed:
            return
        now = time.time()
        rows = [(key, json.dumps(dataclasses.asdict(g)), now) for key, g in items]
        try:
            self._db.execute("BEGIN IMMEDIATE")  # one transaction for the batch
            try:
                self._db.executemany("INSERT OR REPLACE INTO responses VALUES (?, ?, ?)", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            self._write_failed = True
            print(
                f"lmdistill: warning: cannot write the response cache {self.path} ({exc}); "
                "going on without storing responses",
                file=sys.stderr,
            )

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _generation_from_json(payload: str) -> Generation:
    data = json.loads(payload)
    # JSON has no tuples: turn the (token, logprob) pairs back into tuples.
    if data.get("top_logprobs") is not None:
        data["top_logprobs"] = [[tuple(p) for p in pos] for pos in data["top_logprobs"]]
    if data.get("token_logprobs") is not None:
        data["token_logprobs"] = [tuple(p) for p in data["token_logprobs"]]
    fields = {f.name for f in dataclasses.fields(Generation)}
    return Generation(**{k: v for k, v in data.items() if k in fields})
