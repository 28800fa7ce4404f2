"""Evaluation results cached by (model fingerprint, task, settings), so re-running a report costs
nothing: no model is loaded, nothing is generated.

A model's fingerprint identifies its weights without reading them all: each file of the model dir
contributes its name and size, plus its content hash when small (config, tokenizer, chat
template: they change answers too) or its modification time when large (weights: hashing 0.5 GB
per run would cost more than some evaluations). Saving new weights changes the mtime, so a
retrained student never reuses its predecessor's results; touching a file only costs a rerun.
API models are fingerprinted by their spec: their answers are not reproducible anyway.

Each entry is one JSON file `<dir>/<key[:2]>/<key>.json`, written atomically (temp file, fsync,
rename: `lmdistill.store`), so concurrent runs and interrupted ones never leave a torn entry.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lmdistill.errors import UserError
from lmdistill.eval.results import ModelTaskResult
from lmdistill.store.atomic import write_json_atomic
from lmdistill.store.digest import file_digest
from lmdistill.teachers.bundled import BUNDLED_NAMES
from lmdistill.teachers.registry import is_api_spec

# Bump when the stored format or the meaning of a metric changes: old entries then never match.
CACHE_VERSION = 1
_HASHED_FILE_BYTES = 16 * 1024 * 1024  # files up to this size are hashed by content


def model_dir(spec: str) -> Path | None:
    """The local model dir `spec` names (a bundled model's converted dir, converting it on
    first use; a Hub model's snapshot), or None for an API model."""
    if is_api_spec(spec):
        return None
    from lmdistill.models import hub_name, resolve_model_dir

    if spec not in BUNDLED_NAMES and not hub_name(spec):
        path = Path(spec).expanduser()
        if not (path / "config.json").is_file():
            raise UserError(
                f"model '{spec}': not a bundled name ({', '.join(BUNDLED_NAMES)}), an API spec, a "
                "Hub name ORG/NAME[@REVISION] or a Hugging Face model dir (no config.json there)"
            )
    return resolve_model_dir(spec)


def dir_fingerprint(path: Path) -> str:
    """A fingerprint of a model dir's files (see the module docstring)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and not _ignored(p.relative_to(path)))
    for file in files:
        stat = file.stat()
        if stat.st_size <= _HASHED_FILE_BYTES:
            what = file_digest(file)
        else:
            what = f"mtime:{stat.st_mtime_ns}"
        digest.update(f"{file.relative_to(path).as_posix()}\0{stat.st_size}\0{what}\n".encode())
    return digest.hexdigest()[:16]


def _ignored(relative: Path) -> bool:
    # Hidden files and lock files come and go without changing the model.
    return any(part.startswith(".") for part in relative.parts) or relative.suffix == ".lock"


def model_fingerprint(spec: str) -> str:
    """The fingerprint of the model `spec` names: of its dir's files, or of the spec for an API."""
    path = model_dir(spec)
    if path is None:
        return "api-" + hashlib.sha256(spec.encode()).hexdigest()[:16]
    return dir_fingerprint(path)


def cache_key(parts: dict[str, Any]) -> str:
    """A stable key for a JSON-able description of what a result depends on."""
    text = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class ResultCache:
    """JSON files under `root`, one per key (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get_json(self, key: str) -> dict[str, Any] | None:
        path = self._path(key)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError):
            return None  # unreadable: recompute and overwrite it

    def put_json(self, key: str, value: dict[str, Any]) -> None:
        write_json_atomic(self._path(key), value, indent=None)

    def get(self, key: str) -> ModelTaskResult | None:
        data = self.get_json(key)
        if data is None:
            return None
        try:
            result = ModelTaskResult.from_json(data)
        except (TypeError, KeyError):
            return None  # written by another version of the format: recompute
        result.cached = True
        return result

    def put(self, key: str, result: ModelTaskResult) -> None:
        self.put_json(key, result.to_json())
