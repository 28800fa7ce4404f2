"""Input records from the sources users bring: a file, a saved dataset, a Hub dataset.

A source (`--prompts`, `data.path`, `cache-logits --data`) is one of
  data.jsonl                      one JSON object per line (any other file name is read as JSONL)
  data.parquet, data.csv          a table, one record per row (CSV cells are strings; a
                                  `messages` or `tools` cell holding a JSON list is decoded)
  DIR, DIR@SPLIT                  a dir written by `datasets`' save_to_disk (SPLIT picks one split
                                  of a DatasetDict; one with a single split needs none)
  hf:NAME[:CONFIG][@SPLIT]        a Hugging Face Hub dataset, streamed (split default: train);
                                  offline (HF_HUB_OFFLINE=1) it is read from the datasets cache

Each record comes with its place for error messages: the line of a JSONL file, the line a CSV row
starts on, the 1-based row of anything else, so a bad record is still `SOURCE:ROW: field ...`.
A table has every column in every row; a null cell counts as an absent field (so one table can
hold rows with `prompt` and rows with `messages`).

A field mapping (`FieldMap`) reads data of another shape without a conversion script: the columns
holding the prompt (plus an optional context appended to it), the response, or a chat list, and the
ShareGPT message shape (`{"from": "human", "value": ...}`). Presets: alpaca, dolly, sharegpt.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator

from lmdistill.data.jsonl import describe, iter_jsonl
from lmdistill.errors import InputError, UserError, did_you_mean

Record = dict[str, Any]
_Bad = Callable[[str, str], InputError]  # (column, message) -> the error naming source:row
HF_PREFIX = "hf:"
_BATCH_ROWS = 1024  # rows per Arrow batch read from a Parquet file: bounded memory per batch


# ------------------------------------------------------------------------------ field mapping
@dataclass(frozen=True)
class FieldMap:
    """Which of a record's fields hold what lmdistill reads (`prompt`, `response`, `messages`).

    prompt: a string, the user's turn; context: an optional string appended to it after a blank
    line (Alpaca's `input`, Dolly's `context`); response: the answer; messages: a chat list, in
    OpenAI ({role, content}) or ShareGPT ({from, value}) shape. A mapped record holds these under
    lmdistill's names, and every field not mapped as it was."""

    prompt: str = "prompt"
    context: str | None = None
    response: str = "response"
    messages: str = "messages"

    def describe(self) -> str:
        """The mapping as `prompt=instruction,context=input,...` (for messages and settings)."""
        return ",".join(
            f"{f.name}={getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name)
        )


PRESETS: dict[str, FieldMap] = {
    "alpaca": FieldMap(prompt="instruction", context="input", response="output"),
    "dolly": FieldMap(prompt="instruction", context="context", response="response"),
    "sharegpt": FieldMap(messages="conversations"),
}
# ShareGPT's speaker names, as OpenAI roles.
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}


def field_map(spec: str | Mapping[str, str] | None) -> FieldMap | None:
    """The mapping `spec` names: a preset (`alpaca`), `key=column,...` (`prompt=instruction`),
    or a mapping {key: column}; None for none. A UserError names an unknown preset or key."""
    if spec is None:
        return None
    if isinstance(spec, str):
        text = spec.strip()
        if "=" not in text:
            if text not in PRESETS:
                raise UserError(
                    f"unknown field mapping '{text}'{did_you_mean(text, PRESETS)}: use a preset "
                    f"({', '.join(PRESETS)}) or KEY=COLUMN,... with keys {', '.join(_keys())}"
                )
            return PRESETS[text]
        pairs: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, sep, column = (s.strip() for s in item.partition("="))
            if not sep or not column:
                raise UserError(f"field mapping '{spec}': '{item}' is not KEY=COLUMN")
            pairs[key] = column
        spec = pairs
    unknown = sorted(set(spec) - set(_keys()))
    if unknown:
        raise UserError(
            f"field mapping: unknown key(s) {', '.join(unknown)} (keys: {', '.join(_keys())})"
        )
    bad = [k for k, v in spec.items() if not isinstance(v, str) or not v]
    if bad:
        raise UserError(f"field mapping: '{bad[0]}' must name a column (a non-empty string)")
    return FieldMap(**dict(spec))


def _checked_fields(spec: str | dict[str, str] | None) -> str | dict[str, str] | None:
    try:
        field_map(spec)
    except UserError as exc:
        raise ValueError(str(exc)) from None
    return spec


# A recipe's field mapping (`data.fields`, `prompts.fields`), kept as written and checked on load.
Fields = Annotated[str | dict[str, str] | None, AfterValidator(_checked_fields)]


def _keys() -> list[str]:
    return [f.name for f in fields(FieldMap)]


def map_fields(fields_: FieldMap, record: Record, source: str, row: int) -> Record:
    """`record` in lmdistill's shape: the mapped columns renamed (prompt + context joined,
    ShareGPT messages as {role, content}), checked here so that an error names the user's
    column; every other field kept. InputError names source:row and the column."""

    def bad(column: str, message: str) -> InputError:
        return InputError(source, message, line=row, field=column)

    mapped = {fields_.prompt, fields_.response, fields_.messages, fields_.context}
    out = {k: v for k, v in record.items() if k not in mapped}
    messages = record.get(fields_.messages)
    if messages is not None:
        out["messages"] = _chat_list(messages, fields_.messages, bad)
    elif record.get(fields_.prompt) is not None:
        prompt = record[fields_.prompt]
        if not isinstance(prompt, str) or not prompt.strip():
            raise bad(fields_.prompt, f"must be a non-empty string, got {describe(prompt)}")
        context = record.get(fields_.context) if fields_.context else None
        if context is not None and not isinstance(context, str):
            raise bad(fields_.context or "", f"must be a string, got {describe(context)}")
        out["prompt"] = f"{prompt}\n\n{context}" if context and context.strip() else prompt
    else:
        raise bad(
            fields_.prompt,
            f"missing: each record needs '{fields_.prompt}' (a string) or '{fields_.messages}' "
            f"(a chat list); its fields: {', '.join(sorted(record)) or 'none'}",
        )
    response = record.get(fields_.response)
    if response is not None:
        if not isinstance(response, str):
            raise bad(fields_.response, f"must be a string, got {describe(response)}")
        out["response"] = response
    return out


def _chat_list(value: Any, column: str, bad: _Bad) -> list[dict[str, Any]]:
    """A chat list as {role, content} messages; ShareGPT's {from, value} converted."""
    if isinstance(value, str):
        value = _json_cell(value, column, bad)
    if not isinstance(value, list) or not value:
        raise bad(column, f"must be a non-empty chat list, got {describe(value)}")
    messages = []
    for i, message in enumerate(value):
        if isinstance(message, dict) and "from" in message and "role" not in message:
            speaker = message["from"]
            role = _SHAREGPT_ROLES.get(str(speaker).lower()) if isinstance(speaker, str) else None
            if role is None:
                raise bad(
                    f"{column}[{i}].from",
                    f"unknown speaker {speaker!r} (known: {', '.join(_SHAREGPT_ROLES)})",
                )
            text = message.get("value")
            if not isinstance(text, str):
                raise bad(f"{column}[{i}].value", f"must be a string, got {describe(text)}")
            rest = {k: v for k, v in message.items() if k not in {"from", "value"}}
            message = {"role": role, "content": text, **rest}
        messages.append(message)
    return messages


def _json_cell(text: str, column: str, bad: _Bad) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad(column, f"not a JSON chat list ({exc.msg} at column {exc.colno})") from None


# ------------------------------------------------------------------------------ sources
def iter_records(
    source: str | Path, fields_: FieldMap | None = None
) -> Iterator[tuple[int, Record]]:
    """(row, record) for each record of `source` (see the module docstring), mapped by
    `fields_` when given. Rows are read as a stream (a Parquet file in batches, a Hub dataset
    streamed), so a caller that does not keep them holds one batch at a time."""
    name = str(source)
    rows = _rows(name, fields_)
    if fields_ is None:
        yield from rows
        return
    for row, record in rows:
        yield row, map_fields(fields_, record, name, row)


def first_record(source: str | Path, fields_: FieldMap | None = None) -> tuple[int, Record]:
    """The first (row, record) of `source`, for a check that must not read it whole."""
    for row, record in iter_records(source, fields_):
        return row, record
    raise UserError(f"{source}: no records")


def _rows(name: str, fields_: FieldMap | None) -> Iterator[tuple[int, Record]]:
    if name.startswith(HF_PREFIX):
        return _hub_rows(name)
    path = Path(name).expanduser()
    if path.is_dir() or (not path.exists() and "@" in path.name and _split_dir(name)[0].is_dir()):
        return _saved_rows(name)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_rows(path)
    if suffix == ".csv":
        json_columns = {"messages", "tools", fields_.messages if fields_ else "messages"}
        return _csv_rows(path, json_columns)
    return iter_jsonl(path)


def _parquet_rows(path: Path) -> Iterator[tuple[int, Record]]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(f"{path}: not a readable Parquet file ({_first_line(exc)})") from None
    row = 0
    for batch in table.iter_batches(batch_size=_BATCH_ROWS):
        for record in batch.to_pylist():
            row += 1
            yield row, _present(record)


def _present(record: Record) -> Record:
    """A table row without its null cells (a field the row does not have)."""
    return {k: v for k, v in record.items() if v is not None}


def _csv_rows(path: Path, json_columns: set[str]) -> Iterator[tuple[int, Record]]:
    """CSV rows with their header's names; a row is numbered by the line it starts on."""
    try:
        handle = path.open(encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None
    with handle:
        reader = csv.DictReader(handle)
        start = 2  # the header is line 1
        try:
            for record in reader:
                if None in record:  # more cells than the header names
                    raise InputError(path, "has more cells than the header names", line=start)
                for column in json_columns & record.keys():
                    text = record[column]
                    if isinstance(text, str) and text.lstrip().startswith("["):
                        record[column] = _csv_json(path, start, column, text)
                yield start, record
                start = reader.line_num + 1
        except UnicodeDecodeError:
            raise InputError(path, "not UTF-8 text; save the file as UTF-8", line=start) from None
        except csv.Error as exc:
            raise InputError(path, f"not valid CSV ({exc})", line=start) from None


def _csv_json(path: Path, row: int, column: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            path, f"not valid JSON ({exc.msg} at column {exc.colno})", line=row, field=column
        ) from None


def _split_dir(name: str) -> tuple[Path, str | None]:
    """DIR@SPLIT as (DIR, SPLIT); a plain DIR as (DIR, None)."""
    path = Path(name).expanduser()
    if path.exists() or "@" not in name:
        return path, None
    base, _, split = name.rpartition("@")
    return Path(base).expanduser(), split


def _saved_rows(name: str) -> Iterator[tuple[int, Record]]:
    """A `save_to_disk` dir, memory-mapped by `datasets` (rows are read as iterated)."""
    import datasets

    path, split = _split_dir(name)
    try:
        saved = datasets.load_from_disk(str(path))
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise UserError(
            f"{name}: not a dataset saved by datasets' save_to_disk, nor a file "
            f"({_first_line(exc)})"
        ) from None
    if isinstance(saved, datasets.DatasetDict):
        splits = list(saved)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in saved:
            which = f"no split '{split}'" if split else "several splits"
            raise UserError(f"{name}: {which}; name one as {path}@SPLIT ({', '.join(splits)})")
        saved = saved[split]
    elif split is not None:
        raise UserError(f"{name}: {path} holds one dataset, not splits; drop '@{split}'")
    return ((row, _present(record)) for row, record in enumerate(saved, start=1))


@dataclass(frozen=True)
class HubDataset:
    """A parsed `hf:NAME[:CONFIG][@SPLIT]`."""

    name: str
    config: str | None
    split: str


def hub_dataset(spec: str) -> HubDataset:
    """`hf:NAME[:CONFIG][@SPLIT]` parsed; a UserError when NAME is missing."""
    body, at, split = spec.removeprefix(HF_PREFIX).partition("@")
    name, colon, config = body.partition(":")
    if not name or (at and not split) or (colon and not config):
        raise UserError(f"'{spec}': expected hf:NAME[:CONFIG][@SPLIT], e.g. hf:tatsu-lab/alpaca")
    return HubDataset(name, config or None, split or "train")


def _hub_rows(spec: str) -> Iterator[tuple[int, Record]]:
    """A Hub dataset streamed (nothing stored; rows arrive as read). Offline, `datasets` reads it
    from its cache instead, which streaming cannot do."""
    import datasets

    from lmdistill.models import hub_offline

    ds = hub_dataset(spec)
    try:
        rows = datasets.load_dataset(
            ds.name, ds.config, split=ds.split, streaming=not hub_offline()
        )
        for row, record in enumerate(rows, start=1):
            yield row, _present(record)
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as exc:
        # ConnectionError (unreachable, offline and not cached), FileNotFoundError, a ValueError
        # for an unknown split or config: datasets' own message says which, on its first line.
        raise UserError(f"{spec}: cannot read it ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ------------------------------------------------------------------------------ identity
def source_exists(source: str | Path) -> bool:
    """Whether a local source is there; a Hub dataset counts as there (it is asked when read)."""
    name = str(source)
    return name.startswith(HF_PREFIX) or _split_dir(name)[0].exists()


def source_digest(source: str | Path, fields_: FieldMap | None = None) -> str:
    """What identifies the records `source` gives, hex: a file's sha256 (as before, so existing
    caches and runs stay valid), a saved dataset's files by content, a Hub dataset by its spec
    (it is not read to hash it); with the field mapping when there is one."""
    name = str(source)
    digest = hashlib.sha256()
    if name.startswith(HF_PREFIX):
        digest.update(name.encode())
    else:
        path, split = _split_dir(name)
        if path.is_dir():  # each file's name, then its bytes
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                digest.update(f"{file.relative_to(path).as_posix()}\0".encode())
                _hash_file(digest, file)
            if split is not None:
                digest.update(f"\0split={split}".encode())
        else:  # the file's bytes alone: the digest every earlier version recorded
            _hash_file(digest, path)
    if fields_ is not None:
        digest.update(f"\0fields={fields_.describe()}".encode())
    return digest.hexdigest()


def _hash_file(digest: Any, path: Path) -> None:
    try:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
