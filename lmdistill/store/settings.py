"""The settings lock: an output remembers the settings it was made with, and continuing it with
other settings is refused (a file mixing two temperatures or two teachers, or a run resumed with
another recipe, would be silently wrong). Issue 14: one home for what five places did apart.

- `changed_settings(old, new)`: the dotted keys whose values differ (the "changed" part every
  lock shares; each caller decides which keys may change, e.g. more rounds).
- `check_settings(out, settings, ...)` / `write_settings(out, settings, ...)`: the lock of an
  appended output file OUT, kept in OUT.meta.json (`lmdistill generate`, tool traces).

Imports nothing from lmdistill but `errors` (and the package's version string)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lmdistill import __version__
from lmdistill.errors import UserError
from lmdistill.store.atomic import write_json_atomic

META_SUFFIX = ".meta.json"


def side_path(out_path: str | Path, suffix: str) -> Path:
    """OUT.meta.json, OUT.failed.jsonl: files that belong to an output file."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + suffix)


def changed_settings(old: Any, new: Any, *, ignore: Iterable[str] = ()) -> list[str]:
    """Dotted keys whose values differ between two nested settings dicts, sorted; a key in
    `ignore` (dotted) is skipped with everything under it. A key present on one side only counts
    as changed (its value there against None)."""
    return _changed(old, new, frozenset(ignore), "")


def _changed(old: Any, new: Any, ignore: frozenset[str], prefix: str) -> list[str]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}{key}"
            if path not in ignore:
                out += _changed(old.get(key), new.get(key), ignore, path + ".")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def value_at(settings: Any, dotted: str) -> Any:
    """The value at a dotted key of nested dicts, None where the path ends early."""
    for key in dotted.split("."):
        settings = settings.get(key) if isinstance(settings, Mapping) else None
    return settings


def check_settings(
    out_path: str | Path, settings: dict[str, Any], *, meta_format: str, writer: str
) -> None:
    """Refuse to continue OUT with other settings than it was made with.

    Every key of `settings` is compared with OUT.meta.json (nested dicts key by key); the meta
    file must have `meta_format`, as written by `writer` (named in the messages). No meta file:
    fine for a new or empty OUT, refused for an OUT something else wrote."""
    out_path = Path(out_path)
    meta_path = side_path(out_path, META_SUFFIX)
    if not meta_path.exists():
        if out_path.exists() and out_path.stat().st_size > 0:
            raise UserError(
                f"{out_path} exists but was not written by {writer} (no {meta_path.name}); "
                "use another --out, or --overwrite to replace it"
            )
        return
    try:
        saved = json.loads(meta_path.read_text(encoding="utf-8"))
        if not isinstance(saved, dict) or saved.get("format") != meta_format:
            raise ValueError(f"not a {writer} meta file")
    except (OSError, ValueError) as exc:
        raise UserError(f"{meta_path}: unreadable ({exc}); use --overwrite to start over") from None
    old = {key: saved.get(key) for key in settings}
    changed = [
        f"{key} {value_at(old, key)!r} -> {value_at(settings, key)!r}"
        for key in changed_settings(old, settings)
    ]
    if changed:
        raise UserError(
            f"{out_path} was made with other settings ({', '.join(changed)}); rerun with the "
            "same settings to continue it, or use another --out, or --overwrite to start over"
        )


def write_settings(out_path: str | Path, settings: dict[str, Any], *, meta_format: str) -> None:
    """Write OUT.meta.json: the settings OUT is made with, which `check_settings` reads back."""
    write_json_atomic(
        side_path(out_path, META_SUFFIX),
        {"format": meta_format, **settings, "lmdistill_version": __version__},
    )
