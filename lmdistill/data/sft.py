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

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmdistill.data.jsonl import iter_jsonl
from lmdistill.errors import InputError, UserError

IGNORE_INDEX = -100
Message = dict[str, Any]


@dataclass(frozen=True)
class Example:
    """One tokenized conversation. `index` is the record's position among the data file's
    non-blank lines (0-based), the key an offline teacher cache uses."""

    input_ids: list[int]  # (T,)
    targets: list[int]  # (T,) aligned next-token targets, IGNORE_INDEX where there is no loss
    index: int

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
    more assistant turns (every assistant turn is trained on)."""
    response = record.get("response")
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
            if not isinstance(message.get("content"), str):
                raise InputError(
                    path, "must be a string", line=line, field=f"messages[{i}].content"
                )
    elif isinstance(record.get("prompt"), str):
        messages = [{"role": "user", "content": record["prompt"]}]
    else:
        raise InputError(
            path, "each record needs 'messages' (a chat list) or 'prompt' (a string)", line=line
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
        return [*messages, {"role": "assistant", "content": response}]
    if not any(m["role"] == "assistant" for m in messages):
        raise InputError(
            path,
            "no assistant turn to train on: add a 'response' or an assistant message",
            line=line,
            field="messages",
        )
    return messages


# ---------------------------------------------------------------------------------- rendering
def render(tokenizer, messages: Sequence[Message], *, add_generation_prompt: bool) -> str:
    """The chat template's text for `messages`. With tokenize=False transformers returns the
    string (with tokenize=True, transformers 5 returns a BatchEncoding); the text is tokenized
    separately, once, so the template's special tokens are not doubled by add_special_tokens."""
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
    getting a wrong mask."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            "the student's tokenizer has no chat template; SFT data is rendered with it"
        )
    full = render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
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
    tokenizer, messages: Sequence[Message], *, max_length: int, index: int
) -> Example | None:
    """Tokenize a conversation with loss on its assistant tokens, truncated to `max_length`
    tokens (the end is cut). None when no assistant token survives the truncation."""
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
    return Example(input_ids=ids, targets=targets, index=index)


@dataclass
class SftData:
    """The examples of one data file, and what was left out."""

    examples: list[Example]
    records: int  # non-blank lines read
    skipped: int  # records whose assistant tokens were all cut by max_length
    filtered: int  # records left out by the split filter


def load_examples(
    path: str | Path, tokenizer, *, max_length: int, split: str | None = None
) -> SftData:
    """Every record of a JSONL file as an `Example` (see `conversation` for the shapes).

    split: keep only records whose `split` field equals it (the bundled prompt set marks held-out
    prompts with split="test"; those must never be trained on)."""
    if max_length < 2:
        raise UserError(f"max_length must be >= 2, got {max_length}")
    examples, skipped, filtered, index = [], 0, 0, -1
    for index, (line, record) in enumerate(iter_jsonl(path)):
        if split is not None and record.get("split") != split:
            filtered += 1
            continue
        messages = conversation(record, path, line)
        try:
            example = encode(tokenizer, messages, max_length=max_length, index=index)
        except UserError as exc:
            raise InputError(path, str(exc), line=line) from None
        if example is None:
            skipped += 1
        else:
            examples.append(example)
    if not examples:
        raise UserError(
            f"{path}: no trainable examples (records: {index + 1}, filtered by split: {filtered}, no assistant tokens within max_length: {skipped})"
        )
    return SftData(examples, records=index + 1, skipped=skipped, filtered=filtered)


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (an offline cache records which data file it was made from)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------ packing
Row = list[int]  # indices into a list of examples, laid out one after another
MicroBatch = list[Row]


def pack_rows(
    lengths: Sequence[int], order: Sequence[int], row_length: int, window: int = 64
) -> list[Row]:
    """Place examples (in `order`) into rows of at most `row_length` tokens, first fit among the
    last `window` rows still open. First fit keeps rows ~full without sorting by length (sorting
    would put all long examples in the same batches); the window bounds the search cost."""
    rows: list[Row] = []
    free: list[int] = []  # free tokens of each row
    first_open = 0
    for i in order:
        n = lengths[i]
        if n > row_length:
            raise UserError(f"example {i} has {n} tokens, more than the row length {row_length}")
        target = next(
            (r for r in range(max(first_open, len(rows) - window), len(rows)) if free[r] >= n), None
        )
        if target is None:
            rows.append([])
            free.append(row_length)
            target = len(rows) - 1
        rows[target].append(i)
        free[target] -= n
        while first_open < len(rows) and free[first_open] == 0:
            first_open += 1
    return rows


def group_rows(
    rows: Sequence[Row], lengths: Sequence[int], tokens_per_batch: int
) -> list[MicroBatch]:
    """Consecutive rows into micro-batches whose padded size (rows x longest row) stays within
    `tokens_per_batch`."""
    batches: list[MicroBatch] = []
    current: MicroBatch = []
    longest = 0
    for row in rows:
        size = sum(lengths[i] for i in row)
        if current and (len(current) + 1) * max(longest, size) > tokens_per_batch:
            batches.append(current)
            current, longest = [], 0
        current.append(row)
        longest = max(longest, size)
    if current:
        batches.append(current)
    return batches


def epoch_plan(
    lengths: Sequence[int],
    *,
    seed: int,
    epoch: int,
    row_length: int,
    tokens_per_batch: int,
    packing: bool = True,
    shuffle: bool = True,
) -> list[MicroBatch]:
    """The micro-batches of one epoch, a pure function of its arguments (so a resumed or
    multi-process run recomputes exactly the same plan, and only a step counter is saved)."""
    order = list(range(len(lengths)))
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(len(lengths)).tolist()
    rows = pack_rows(lengths, order, row_length) if packing else [[i] for i in order]
    return group_rows(rows, lengths, tokens_per_batch)


# ---------------------------------------------------------------------------------- collation
@dataclass
class Batch:
    """Packed rows, right-padded to the longest.

    input_ids, position_ids, targets: (B, T) int64; targets as in `Example`.
    real: (B, T) bool, true on non-padding tokens.
    teacher_ids, teacher_logprobs: (B, T, k) int64 / float32 from an offline cache, filled where
    targets != IGNORE_INDEX (zeros elsewhere), or None."""

    input_ids: Tensor
    position_ids: Tensor
    targets: Tensor
    real: Tensor
    teacher_ids: Tensor | None = None
    teacher_logprobs: Tensor | None = None

    @property
    def tokens(self) -> int:
        return int(self.real.sum())

    @property
    def loss_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str) -> Batch:
        fields = {f: getattr(self, f) for f in self.__dataclass_fields__}
        return Batch(**{f: None if t is None else t.to(device) for f, t in fields.items()})


# An offline teacher source: example -> (ids (n, k), log-probs (n, k)) for its n loss positions.
TopkLookup = Callable[[Example], tuple[np.ndarray, np.ndarray]]


def collate(
    examples: Sequence[Example],
    micro_batch: MicroBatch,
    pad_id: int,
    topk: TopkLookup | None = None,
) -> Batch:
    """Lay out the rows of `micro_batch` (indices into `examples`) as one `Batch`."""
    width = max(sum(len(examples[i]) for i in row) for row in micro_batch)
    shape = (len(micro_batch), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    targets = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    real = torch.zeros(shape, dtype=torch.bool)
    for b, row in enumerate(micro_batch):
        start = 0
        for i in row:
            ex = examples[i]
            stop = start + len(ex)
            input_ids[b, start:stop] = torch.tensor(ex.input_ids)
            position_ids[b, start:stop] = torch.arange(len(ex))
            targets[b, start:stop] = torch.tensor(ex.targets)
            real[b, start:stop] = True
            start = stop
    batch = Batch(input_ids, position_ids, targets, real)
    if topk is not None:
        laid_out = [examples[i] for row in micro_batch for i in row]
        batch.teacher_ids, batch.teacher_logprobs = _cached_topk(laid_out, targets, topk)
    return batch


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
