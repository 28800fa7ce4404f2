"""Chat examples for training: rendering with the chat template, loss masks, truncation, packing.

One example is a conversation rendered with the tokenizer's chat template and tokenized once. Its
`targets` are already aligned with its positions: `targets[t]` is the token the model must predict
after reading `input_ids[: t + 1]` (so `input_ids[t + 1]` on assistant tokens, -100 elsewhere, and
always -100 at the last position). Aligning inside each example, before packing, is what keeps the
loss from crossing example boundaries: a packed row never asks the last token of one example to
predict the first token of the next.

Packing several examples into one row keeps attention inside each example too: `position_ids`
restart at 0 for every example, and transformers builds the block-diagonal causal mask from the
restarts (`masking_utils.find_packed_sequence_indices`) for sdpa, eager and flex attention, and uses
variable-length kernels for flash-attention. That only happens when the model is called without an
attention mask and without a KV cache (`use_cache=False`); `check_packing` verifies it on the
actual model. Padding positions get position 0 each, so each is a one-token "sequence" of its own
that no real token attends to.
"""

from __future__ import annotations

import itertools
import math
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from lmdistill.data import Message
from lmdistill.data.records import FieldMap, iter_records, source_digest
from lmdistill.data.tokens import (
    TokenArrays,
    TokenWriter,
    open_or_build,
    tokenization_fingerprint,
)
from lmdistill.data.tool_format import (
    plain_messages,
    render_tool_chat,
    supports_native_tools,
    uses_tools,
)
from lmdistill.errors import InputError, UserError

if TYPE_CHECKING:
    from lmdistill.data.cross_tokenizer import TeacherRows

IGNORE_INDEX = -100


class Conversation(list):
    """A list of messages that also carries the tool schemas the conversation was held with
    (`tools`, OpenAI function shape, or None). `render` and `assistant_spans` read them, so tool
    records go through `encode` unchanged; pass this object itself, not a copy."""

    def __init__(self, messages=(), tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(messages)
        self.tools = tools


@dataclass(frozen=True)
class Example:
    """One tokenized conversation. `index` is the record's position among the data file's
    non-blank lines (0-based), the key an offline teacher cache uses."""

    input_ids: list[int]  # (T,)
    targets: list[int]  # (T,) aligned next-token targets, IGNORE_INDEX where there is no loss
    index: int
    # (T,) per-position loss weights (see `span_weights`); None means all 1, so data without
    # span weights (and the teacher caches made from it) are unchanged.
    weights: list[float] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def loss_tokens(self) -> int:
        return sum(t != IGNORE_INDEX for t in self.targets)


# ------------------------------------------------------------------------------------ records
def conversation(record: dict[str, Any], path: str | Path, line: int) -> list[Message]:
    """The full conversation of one input record, ending with an assistant turn.

    Accepted shapes: the generate pipeline's output (`messages` = the prompt, `response` = the
    teacher's answer), `prompt` (a string) + `response`, or `messages` that already hold one or
    more assistant turns (every assistant turn is trained on).

    Tool use (OpenAI function-calling shape, see lmdistill.data.tool_format): an optional `tools`
    list of function schemas, assistant messages with `tool_calls` (their content may be null),
    and `tool` messages with the results. Such a record comes back as a `Conversation` carrying
    its `tools`; only the assistant turns (calls and answers) are trained on, never the results."""
    response = record.get("response")
    tools = _check_tools(record, path, line)
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise InputError(
                path, "must be a non-empty list of {role, content}", line=line, field="messages"
            )
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise InputError(
                    path, "must be an object with a 'role'", line=line, field=f"messages[{i}]"
                )
            if message.get("tool_calls") is not None and message["role"] == "assistant":
                _check_tool_calls(message["tool_calls"], path, line, f"messages[{i}].tool_calls")
                if message.get("content") is None:
                    continue  # a call without text
            if not isinstance(message.get("content"), str):
                raise InputError(
                    path, "must be a string", line=line, field=f"messages[{i}].content"
                )
    elif isinstance(record.get("prompt"), str):
        messages = [{"role": "user", "content": record["prompt"]}]
    else:
        raise InputError(
            path,
            "each record needs 'messages' (a chat list) or 'prompt' (a string); for data of another "
            "shape set data.fields (alpaca, dolly, sharegpt or KEY=COLUMN,...)",
            line=line,
        )
    if response is not None:
        if not isinstance(response, str):
            raise InputError(path, "must be a string", line=line, field="response")
        if messages[-1]["role"] == "assistant":
            raise InputError(
                path,
                "the messages already end with an assistant turn and a 'response' is given too",
                line=line,
                field="response",
            )
        messages = [*messages, {"role": "assistant", "content": response}]
    elif not any(m["role"] == "assistant" for m in messages):
        raise InputError(
            path,
            "no assistant turn to train on: add a 'response' or an assistant message",
            line=line,
            field="messages",
        )
    if tools is not None or uses_tools(messages):
        return Conversation(messages, tools)
    return messages


def _check_tools(record: dict[str, Any], path: str | Path, line: int) -> list[dict] | None:
    """A record's `tools` (function schemas), None when it has none."""
    tools = record.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise InputError(path, "must be a list of function schemas", line=line, field="tools")
    for j, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InputError(
                path,
                'must be {"type": "function", "function": {"name", "description", "parameters"}}',
                line=line,
                field=f"tools[{j}]",
            )
    return tools


def _check_tool_calls(calls: Any, path: str | Path, line: int, where: str) -> None:
    if not isinstance(calls, list):
        raise InputError(path, "must be a list of calls", line=line, field=where)
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InputError(
                path,
                'must be {"id", "type": "function", "function": {"name", "arguments"}}',
                line=line,
                field=f"{where}[{j}]",
            )
        if not isinstance(function.get("arguments", ""), str | dict):
            raise InputError(
                path,
                "must be a JSON string (or an object)",
                line=line,
                field=f"{where}[{j}].function.arguments",
            )


# ---------------------------------------------------------------------------------- rendering
def render(
    tokenizer,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool,
    tools: Sequence[dict[str, Any]] | None = None,
) -> str:
    """The chat template's text for `messages`. With tokenize=False transformers returns the
    string (with tokenize=True, transformers 5 returns a BatchEncoding); the text is tokenized
    separately, once, so the template's special tokens are not doubled by add_special_tokens.

    A tool-use conversation (`tools`, by default those a `Conversation` carries, or messages with
    tool calls or results) is rendered by `tool_format.render_tool_chat`: natively when the
    template supports tools, else in the documented fallback convention."""
    if tools is None:
        tools = getattr(messages, "tools", None)
    if tools is not None or uses_tools(messages):
        text = render_tool_chat(
            tokenizer, messages, tools, add_generation_prompt=add_generation_prompt
        )
    else:
        text = tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    if not isinstance(text, str):
        raise UserError("the tokenizer's apply_chat_template(tokenize=False) did not return text")
    return text


def assistant_spans(tokenizer, messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, character spans of the assistant turns that carry the loss).

    Found by rendering prefixes: turn i starts where the rendering of messages[:i] with the
    generation prompt ends, and ends where the rendering of messages[: i + 1] ends, minus trailing
    whitespace (so ChatML's end-of-turn token is trained on, the newline after it is not: the
    model stops at the end-of-turn token and never generates that newline). This works for any
    template whose renderings of successive prefixes extend each other; a template that rewrites
    earlier turns (e.g. dropping earlier reasoning) is refused with a clear error instead of
    getting a wrong mask.

    Tool use: with a template that renders tools natively, the prefixes are rendered with the
    tools; otherwise the conversation is first rewritten in the fallback convention, where calls
    are assistant text and results are user turns, so results never carry the loss."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "the student's tokenizer has no chat template; SFT data is rendered with it"
        )
    tools = getattr(messages, "tools", None)
    if (tools is not None or uses_tools(messages)) and not supports_native_tools(tokenizer):
        messages, tools = plain_messages(messages, tools), None
    full = render(tokenizer, messages, add_generation_prompt=False, tools=tools)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        # The last turn's rendering is the full text (a third of the rendering time saved).
        last = i == len(messages) - 1
        upto = (
            full
            if last
            else render(tokenizer, messages[: i + 1], add_generation_prompt=False, tools=tools)
        )
        if not (full.startswith(upto) and upto.startswith(prefix)):
            raise UserError(
                "the chat template renders a conversation differently from its prefixes, so the "
                "assistant tokens cannot be located; use a template without history rewriting"
            )
        end = len(upto.rstrip())
        if end > len(prefix):
            spans.append((len(prefix), end))
    return full, spans


def encode(
    tokenizer,
    messages: Sequence[Message],
    *,
    max_length: int,
    index: int,
    span_weights: SpanWeights | None = None,
    answer_start: int | None = None,
) -> Example | None:
    """Tokenize a conversation with loss on its assistant tokens, truncated to `max_length`
    tokens (the end is cut). None when no assistant token survives the truncation.

    span_weights, answer_start: per-position loss weights for the reasoning and the final answer
    of the last assistant turn (the response); see `SpanWeights`."""
    text, spans = assistant_spans(tokenizer, messages)
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("training needs a fast (Rust) tokenizer: it maps tokens to characters")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])[:max_length]
    offsets = encoded["offset_mapping"]
    # A token is the assistant's when it starts inside an assistant span; a token straddling the
    # boundary belongs to the prompt (the model reads it, it cannot predict part of it).
    starts = np.array([start for start, _ in offsets[: len(ids)]], dtype=np.int64)
    is_assistant = np.zeros(len(ids), dtype=bool)
    for lo, hi in spans:
        is_assistant |= (starts >= lo) & (starts < hi)
    targets = [IGNORE_INDEX] * len(ids)
    for t in np.flatnonzero(is_assistant[1:]):
        targets[t] = ids[t + 1]
    if all(t == IGNORE_INDEX for t in targets):
        return None
    weights = None
    if span_weights is not None:
        answer = None
        if answer_start is not None:
            answer = answer_offset(text, spans, messages, answer_start)
        weights = position_weights(starts, targets, answer, span_weights)
    return Example(input_ids=ids, targets=targets, index=index, weights=weights)


# --------------------------------------------------------------------------- span loss weights
@dataclass(frozen=True)
class SpanWeights:
    """Loss weights of the reasoning and the final answer of a response (issue #5).

    Records from the reasoning filter carry `answer_start`, the character offset in `response`
    where the final-answer line starts. A trained token is in the answer when its first character
    is at or after it, and reasoning otherwise (earlier assistant turns included); without an
    `answer_start` the whole response is reasoning."""

    reasoning: float = 1.0
    answer: float = 1.0


def answer_offset(
    text: str, spans: Sequence[tuple[int, int]], messages: Sequence[Message], answer_start: int
) -> int:
    """Where the final answer starts in the rendered `text`: the start of the last assistant span
    (the response) plus `answer_start`. Checked against the response's text, so a template that
    does not render the response verbatim is an error rather than a shifted answer span."""
    response = next(m for m in reversed(messages) if m["role"] == "assistant")["content"]
    start = spans[-1][0]
    if text[start : start + answer_start] != response[:answer_start]:
        raise UserError(
            "answer_start: the chat template does not render the response verbatim at the start "
            "of its assistant turn, so the answer's position in the tokens is unknown"
        )
    return start + answer_start


def position_weights(
    starts: np.ndarray, targets: Sequence[int], answer: int | None, span_weights: SpanWeights
) -> list[float] | None:
    """(T,) loss weights: position t predicts token t + 1, so it takes that token's weight (answer
    when the token starts at or after the character offset `answer`). Positions without a target
    get 1. None when every weight is 1 (the example then looks like one without span weights)."""
    in_answer = np.zeros(len(targets), dtype=bool)
    if answer is not None:
        in_answer[:-1] = starts[1:] >= answer
    weights = np.where(in_answer, span_weights.answer, span_weights.reasoning)
    weights[np.asarray(targets) == IGNORE_INDEX] = 1.0
    return None if (weights == 1.0).all() else weights.tolist()


class Examples(Sequence[Example]):
    """Tokenized examples in a token cache (`lmdistill.data.tokens`), in data order, or the subset
    at `positions`. Example i is built from the memory-mapped arrays when it is asked for, so
    holding a million of them costs 8 bytes each (their positions), not their tokens."""

    def __init__(self, arrays: TokenArrays, positions: np.ndarray | None = None) -> None:
        self.arrays = arrays
        self.positions = positions
        self._lengths: np.ndarray | None = None

    def __len__(self) -> int:
        if self.positions is not None:
            return len(self.positions)
        return len(self.arrays.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """(E,) int64 token counts, all a packing plan needs."""
        if self._lengths is None:
            lengths = np.diff(np.asarray(self.arrays.offsets))
            self._lengths = lengths if self.positions is None else lengths[self.positions]
        return self._lengths

    def __getitem__(self, i):  # int -> Example; slice -> list[Example]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return self._example(int(self.positions[i]) if self.positions is not None else i)

    def _example(self, p: int) -> Example:
        a = self.arrays
        lo, hi = int(a.offsets[p]), int(a.offsets[p + 1])
        weights = None
        if a.weighted is not None and a.weighted[p]:
            weights = a.weights[lo:hi].tolist()
        return Example(
            input_ids=a.input_ids[lo:hi].tolist(),
            targets=a.targets[lo:hi].tolist(),
            index=int(a.records[p]),
            weights=weights,
        )

    def subset(self, positions: np.ndarray) -> Examples:
        """The examples at `positions` (indices into this sequence), in that order."""
        positions = np.asarray(positions, dtype=np.int64)
        if self.positions is not None:
            positions = self.positions[positions]
        return Examples(self.arrays, positions)

    def by_record(self) -> ByRecord:
        """These examples looked up by record index (see `ByRecord`)."""
        if self.positions is not None:
            raise ValueError("by_record() needs every example of the cache, not a subset")
        return ByRecord(self, int(self.arrays.meta["records"]))


class ByRecord:
    """Examples by record index: `[r]` is record r's example, or None when it has none (split
    off, or no assistant token within max_length), and `len` the number of records (as a list
    over records: what the teacher cache's shards slice); `get`, `in` and iteration (the record
    indices that have an example) as for a dict keyed by record index (the cross-tokenizer
    teacher's view)."""

    def __init__(self, examples: Examples, records: int) -> None:
        self.examples = examples
        self.records = records

    def __len__(self) -> int:
        return self.records

    def _position(self, record: int) -> int | None:
        keys = self.examples.arrays.records
        p = int(np.searchsorted(keys, record))
        return p if p < len(keys) and int(keys[p]) == record else None

    def __getitem__(self, r):  # int -> Example | None; slice -> list
        if isinstance(r, slice):
            return [self[j] for j in range(*r.indices(len(self)))]
        p = self._position(int(r))
        return None if p is None else self.examples[p]

    def get(self, record: int, default: Any = None) -> Example | None:
        example = self[record]
        return default if example is None else example

    def __contains__(self, record: object) -> bool:
        return isinstance(record, int) and self._position(record) is not None

    def __iter__(self) -> Iterator[int]:
        """The record indices that have an example (as a dict's keys)."""
        for lo in range(0, len(self.examples), _CHUNK):
            yield from self.examples.arrays.records[lo : lo + _CHUNK].tolist()


@dataclass
class SftData:
    """The examples of one data source, and what was left out."""

    examples: Examples
    records: int  # records read
    skipped: int  # records whose assistant tokens were all cut by max_length
    filtered: int  # records left out by the split filter


def load_examples(
    path: str | Path,
    tokenizer,
    *,
    max_length: int,
    split: str | None = None,
    span_weights: SpanWeights | None = None,
    fields: FieldMap | None = None,
    require: bool = True,
) -> SftData:
    """Every record of a data source (a JSONL, Parquet or CSV file, a saved dataset, a Hub
    dataset: `lmdistill.data.records`) as an `Example` (see `conversation` for the shapes).

    Tokenized once, as a stream, into the token cache (`lmdistill.data.tokens`): a later call
    with the same tokenizer, data and settings reads the cache and tokenizes nothing, and memory
    does not grow with the data either way.

    split: keep only records whose `split` field equals it (the bundled prompt set marks held-out
    prompts with split="test"; those must never be trained on).
    span_weights: weigh the loss of reasoning and final-answer tokens (records' `answer_start`).
    fields: where the prompt, response or messages are in records of another shape.
    require: raise a UserError when no record gives an example."""
    if max_length < 2:
        raise UserError(f"max_length must be >= 2, got {max_length}")
    settings = {
        "tokenizer": tokenization_fingerprint(tokenizer),
        "source": source_digest(path, fields),
        "max_length": max_length,
        "split": split,
        "span_weights": None if span_weights is None else asdict(span_weights),
    }

    def build(writer: TokenWriter) -> dict[str, Any]:
        skipped, filtered, index = 0, 0, -1
        for index, (line, record) in enumerate(iter_records(path, fields)):
            if split is not None and record.get("split") != split:
                filtered += 1
                continue
            messages = conversation(record, path, line)
            answer_start = (
                record_answer_start(record, messages, path, line) if span_weights else None
            )
            try:
                example = encode(
                    tokenizer,
                    messages,
                    max_length=max_length,
                    index=index,
                    span_weights=span_weights,
                    answer_start=answer_start,
                )
            except UserError as exc:
                raise InputError(path, str(exc), line=line) from None
            if example is None:
                skipped += 1
            else:
                writer.append(index, example.input_ids, example.targets, example.weights)
        return {"source": str(path), "records": index + 1, "skipped": skipped, "filtered": filtered}

    arrays = open_or_build(settings, build)
    meta = arrays.meta
    data = SftData(Examples(arrays), meta["records"], meta["skipped"], meta["filtered"])
    if require and not len(data.examples):
        raise UserError(
            f"{path}: no trainable examples (records: {data.records}, filtered by split: "
            f"{data.filtered}, no assistant tokens within max_length: {data.skipped})"
        )
    return data


def record_answer_start(
    record: dict[str, Any], messages: Sequence[Message], path: str | Path, line: int
) -> int | None:
    """The record's `answer_start` (None when absent), checked to lie within its response."""
    answer_start = record.get("answer_start")
    if answer_start is None:
        return None
    response = next(m for m in reversed(messages) if m["role"] == "assistant")["content"]
    if (
        not isinstance(answer_start, int)
        or isinstance(answer_start, bool)
        or not 0 <= answer_start <= len(response)
    ):
        raise InputError(
            path,
            f"must be a character offset in the response (0..{len(response)}), got {answer_start!r}",
            line=line,
            field="answer_start",
        )
    return answer_start


# ------------------------------------------------------------------------------------ packing
Row = list[int]  # indices into a list of examples, laid out one after another
MicroBatch = list[Row]
_CHUNK = 1 << 16  # examples converted to Python ints at a time while packing


class Plan(Sequence[MicroBatch]):
    """The micro-batches of one epoch, stored flat (issue 13): the example indices in layout order
    (4 bytes each), where each row starts, where each micro-batch starts. A plan over a million
    examples takes ~10 MB instead of ~100 MB of nested lists; `plan[b]` gives micro-batch b as
    lists of rows, the shape `collate` takes."""

    def __init__(self, layout: np.ndarray, row_bounds: np.ndarray, batch_bounds: np.ndarray):
        self.layout, self.row_bounds, self.batch_bounds = layout, row_bounds, batch_bounds

    def __len__(self) -> int:
        return len(self.batch_bounds) - 1

    def __getitem__(self, b):  # int -> MicroBatch; slice -> list[MicroBatch]
        if isinstance(b, slice):
            return [self[i] for i in range(*b.indices(len(self)))]
        if not -len(self) <= b < len(self):
            raise IndexError(b)
        b %= len(self)
        rows = self.row_bounds[self.batch_bounds[b] : self.batch_bounds[b + 1] + 1].tolist()
        return [self.layout[lo:hi].tolist() for lo, hi in itertools.pairwise(rows)]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]


def _pack(
    lengths: np.ndarray, order: np.ndarray, row_length: int, window: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First fit of the examples in `order` among the last `window` rows still open; (layout:
    example indices row after row, row bounds (R + 1,), tokens per row (R,))."""
    free: list[int] = []  # free tokens of each row (a list: its slices iterate fastest)
    row_of = array("q")  # the row of each example, in `order`
    first_open = 0
    for lo in range(0, len(order), _CHUNK):
        chunk = order[lo : lo + _CHUNK]
        for i, n in zip(chunk.tolist(), lengths[chunk].tolist(), strict=True):
            if n > row_length:
                raise UserError(
                    f"example {i} has {n} tokens, more than the row length {row_length}"
                )
            rows = len(free)
            start = max(first_open, rows - window, 0)
            r = rows
            for k, f in enumerate(free[start:rows]):
                if f >= n:
                    r = start + k
                    break
            if r == rows:
                free.append(row_length)
            free[r] -= n
            row_of.append(r)
            while first_open < len(free) and free[first_open] == 0:
                first_open += 1
    row_of_np = np.frombuffer(row_of, dtype=np.int64) if row_of else np.zeros(0, np.int64)
    # Rows in creation order, each row's examples in the order they were placed.
    layout = order[np.argsort(row_of_np, kind="stable")]
    row_bounds = np.zeros(len(free) + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_of_np, minlength=len(free)), out=row_bounds[1:])
    tokens = row_length - np.asarray(free, dtype=np.int64)
    return layout, row_bounds, tokens


def _group(row_tokens: np.ndarray, tokens_per_batch: int) -> np.ndarray:
    """Micro-batch bounds (B + 1,) over consecutive rows: a micro-batch's padded size (rows x
    longest row) stays within `tokens_per_batch`."""
    bounds, count, longest = [0], 0, 0
    for r, size in enumerate(row_tokens.tolist()):
        if count and (count + 1) * max(longest, size) > tokens_per_batch:
            bounds.append(r)
            count, longest = 0, 0
        count += 1
        longest = max(longest, size)
    if count:
        bounds.append(len(row_tokens))
    return np.asarray(bounds, dtype=np.int64)


def pack_rows(
    lengths: Sequence[int], order: Sequence[int], row_length: int, window: int = 64
) -> list[Row]:
    """Place examples (in `order`) into rows of at most `row_length` tokens, first fit among the
    last `window` rows still open. First fit keeps rows ~full without sorting by length (sorting
    would put all long examples in the same batches); the window bounds the search cost."""
    layout, bounds, _ = _pack(
        np.asarray(lengths, dtype=np.int64), np.asarray(order, dtype=np.int64), row_length, window
    )
    return [layout[lo:hi].tolist() for lo, hi in itertools.pairwise(bounds)]


def group_rows(
    rows: Sequence[Row], lengths: Sequence[int], tokens_per_batch: int
) -> list[MicroBatch]:
    """Consecutive rows into micro-batches whose padded size (rows x longest row) stays within
    `tokens_per_batch`."""
    tokens = np.asarray([sum(lengths[i] for i in row) for row in rows], dtype=np.int64)
    bounds = _group(tokens, tokens_per_batch).tolist()
    return [list(rows[lo:hi]) for lo, hi in itertools.pairwise(bounds)]


def epoch_plan(
    lengths: Sequence[int] | np.ndarray,
    *,
    seed: int,
    epoch: int,
    row_length: int,
    tokens_per_batch: int,
    packing: bool = True,
    shuffle: bool = True,
) -> Plan:
    """The micro-batches of one epoch, a pure function of its arguments (so a resumed or
    multi-process run recomputes exactly the same plan, and only a step counter is saved). It
    reads the examples' lengths only."""
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.arange(len(lengths))
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(len(lengths))
    if packing:
        layout, row_bounds, tokens = _pack(lengths, order, row_length, window=64)
    else:
        layout, row_bounds, tokens = order, np.arange(len(order) + 1), lengths[order]
    index = np.int32 if len(lengths) < 2**31 else np.int64
    return Plan(layout.astype(index), row_bounds, _group(tokens, tokens_per_batch))


# ---------------------------------------------------------------------------------- collation
@dataclass
class Batch:
    """Packed rows, right-padded to the longest.

    input_ids, position_ids, targets: (B, T) int64; targets as in `Example`.
    real: (B, T) bool, true on non-padding tokens.
    teacher_ids, teacher_logprobs: (B, T, k) int64 / float32 from an offline cache, filled where
    targets != IGNORE_INDEX (zeros elsewhere), or None.
    weights: (B, T) float32 per-position loss weights (`Example.weights`, 1 where an example has
    none), or None when no example has any.
    sampled: the targets are the student's own samples (an on-policy step), not the data's.
    teacher_side: the teacher's own tokenization of these rows and the aligned positions
    (cross-tokenizer ULD, `data.cross_tokenizer`), or None."""

    input_ids: Tensor
    position_ids: Tensor
    targets: Tensor
    real: Tensor
    teacher_ids: Tensor | None = None
    teacher_logprobs: Tensor | None = None
    weights: Tensor | None = None
    sampled: bool = False
    teacher_side: TeacherRows | None = None

    @property
    def tokens(self) -> int:
        return int(self.real.sum())

    @property
    def loss_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str) -> Batch:
        fields = {f: getattr(self, f) for f in self.__dataclass_fields__}
        # Tensors and tensor bundles move; None and flags (`sampled`) stay.
        return Batch(**{f: t.to(device) if hasattr(t, "to") else t for f, t in fields.items()})


# An offline teacher source: example -> (ids (n, k), log-probs (n, k)) for its n loss positions.
TopkLookup = Callable[[Example], tuple[np.ndarray, np.ndarray]]


def collate(
    examples: Sequence[Example],
    micro_batch: MicroBatch,
    pad_id: int,
    topk: TopkLookup | None = None,
) -> Batch:
    """Lay out the rows of `micro_batch` (indices into `examples`) as one `Batch`."""
    rows = [[examples[i] for i in row] for row in micro_batch]  # each read once from the cache
    width = max(sum(len(ex) for ex in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    targets = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    real = torch.zeros(shape, dtype=torch.bool)
    for b, row in enumerate(rows):
        start = 0
        for ex in row:
            stop = start + len(ex)
            input_ids[b, start:stop] = torch.tensor(ex.input_ids)
            position_ids[b, start:stop] = torch.arange(len(ex))
            targets[b, start:stop] = torch.tensor(ex.targets)
            real[b, start:stop] = True
            start = stop
    batch = Batch(input_ids, position_ids, targets, real)
    batch.weights = _layout_weights(rows, shape)
    if topk is not None:
        laid_out = [ex for row in rows for ex in row]
        batch.teacher_ids, batch.teacher_logprobs = _cached_topk(laid_out, targets, topk)
    return batch


def _layout_weights(rows: Sequence[Sequence[Example]], shape: tuple[int, int]) -> Tensor | None:
    """(B, T) loss weights laid out like `collate`'s rows, or None when no example has weights."""
    if all(ex.weights is None for row in rows for ex in row):
        return None
    weights = torch.ones(shape)
    for b, row in enumerate(rows):
        start = 0
        for ex in row:
            if ex.weights is not None:
                weights[b, start : start + len(ex)] = torch.tensor(ex.weights)
            start += len(ex)
    return weights


def _cached_topk(
    laid_out: Sequence[Example], targets: Tensor, topk: TopkLookup
) -> tuple[Tensor, Tensor]:
    """(B, T, k) ids and log-probs with each example's cached rows at its loss positions.

    The loss positions of a batch, read row by row, are those of its examples in layout order,
    each in position order: the order of the cache's rows, so one masked assignment places them."""
    found = [topk(ex) for ex in laid_out]
    for ex, (ids, _) in zip(laid_out, found, strict=True):
        if len(ids) != ex.loss_tokens:
            raise UserError(
                f"the teacher cache has {len(ids)} positions for record {ex.index}, the data has "
                f"{ex.loss_tokens}: the cache was made from other data or another max_length"
            )
    k = found[0][0].shape[1]
    keep = targets.reshape(-1) != IGNORE_INDEX
    ids = torch.zeros(keep.numel(), k, dtype=torch.long)
    logprobs = torch.zeros(keep.numel(), k, dtype=torch.float32)
    ids[keep] = torch.from_numpy(np.concatenate([f[0] for f in found]).astype(np.int64))
    logprobs[keep] = torch.from_numpy(np.concatenate([f[1] for f in found]).astype(np.float32))
    return ids.view(*targets.shape, k), logprobs.view(*targets.shape, k)


def check_packing(model: torch.nn.Module, *, atol: float = 1e-4) -> None:
    """Raise UserError unless `model` keeps packed examples apart: two short sequences packed in
    one row must give the same logits as each run alone. Cheap (three forwards of a few tokens);
    it guards against attention implementations or transformers versions that ignore the
    restarting position_ids and would silently attend across examples."""
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randint(vocab, (1, n), generator=generator) for n in (5, 3))
    device = next(model.parameters()).device
    a, b = a.to(device), b.to(device)
    packed_ids = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(5), torch.arange(3)]).unsqueeze(0).to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(input_ids=packed_ids, position_ids=positions, use_cache=False).logits
            alone = torch.cat([model(input_ids=x, use_cache=False).logits for x in (a, b)], dim=1)
    finally:
        model.train(was_training)
    error = (packed.float() - alone.float()).abs().max().item()
    if not math.isfinite(error) or error > atol * max(1.0, alone.abs().max().item()):
        impl = getattr(model.config, "_attn_implementation", "?")
        raise UserError(
            f"this model (attention '{impl}') lets packed examples attend to each other "
            f"(max logit difference {error:.3g}); set batch.packing=false"
        )
