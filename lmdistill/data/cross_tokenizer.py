"""The teacher's side of cross-tokenizer distillation (ULD): each example tokenized by the teacher's
own tokenizer and chat template, laid out in the same packed rows as the student's batch, and the
positions of the two tokenizations aligned.

Alignment (Boizard et al. 2024, arXiv:2402.12030, sec. 3): the i-th response position of the
student (the position whose logits predict its i-th assistant token) is paired with the i-th
response position of the teacher, and the longer response is truncated to the shorter. With several
assistant turns the response positions of all turns are numbered in order.

Limits: index alignment is exact only when both tokenizers cut the response into the same number of
pieces at the same places. When one segments much more finely (e.g. digits, code or non-English
text), the pairing drifts along the response: position i of one model is compared with a position
of the other that predicts a different part of the text, and the tail of the longer response gets
no ULD term at all (it keeps its cross-entropy). `aligned_fraction` measures how much of the
student's response is covered.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lmdistill.data.records import FieldMap
from lmdistill.data.sft import IGNORE_INDEX, ByRecord, Example, MicroBatch, load_examples
from lmdistill.models import ensure_chat_template


def response_positions(example: Example) -> list[int]:
    """Positions whose logits predict an assistant token, in order."""
    return [t for t, target in enumerate(example.targets) if target != IGNORE_INDEX]


def load_teacher_examples(
    path: str | Path,
    tokenizer,
    *,
    max_length: int,
    split: str | None = None,
    fields: FieldMap | None = None,
) -> ByRecord:
    """Every record of the training file tokenized by the teacher (its chat template, or the plain
    one), looked up by the record's index (read from the token cache when asked for). A record whose assistant tokens max_length cuts away on the
    teacher's side is absent: its student example then gets cross-entropy only."""
    ensure_chat_template(tokenizer)
    data = load_examples(path, tokenizer, max_length=max_length, split=split, fields=fields)
    return data.examples.by_record()


def aligned_fraction(students: Sequence[Example], teachers: Mapping[int, Example]) -> float:
    """Share of the students' response positions that get a teacher position."""
    total, aligned = 0, 0
    for student in students:  # each read once from the token cache
        total += student.loss_tokens
        teacher = teachers.get(student.index)
        if teacher is not None:
            aligned += min(student.loss_tokens, teacher.loss_tokens)
    return aligned / max(total, 1)


@dataclass
class TeacherRows:
    """The teacher's tokenization of one student micro-batch, in the same rows.

    input_ids, position_ids: (B, Tt) int64, packed and right-padded like `data.sft.Batch`.
    real: (B, Tt) bool, true on non-padding tokens.
    student_rows: (M,) int64 flat indices into the student's (B * T) positions.
    teacher_rows: (M,) int64 flat indices into the teacher's (B * Tt) positions; the pair
        (student_rows[j], teacher_rows[j]) is one aligned response position."""

    input_ids: Tensor
    position_ids: Tensor
    real: Tensor
    student_rows: Tensor
    teacher_rows: Tensor

    def to(self, device: torch.device | str) -> TeacherRows:
        fields = {f: getattr(self, f) for f in self.__dataclass_fields__}
        return TeacherRows(**{f: t.to(device) for f, t in fields.items()})


def collate_teacher(
    examples: Sequence[Example],
    teachers: Mapping[int, Example],
    micro_batch: MicroBatch,
    pad_id: int,
) -> TeacherRows:
    """The teacher-side rows of `micro_batch` (indices into the student's `examples`), laid out as
    `data.sft.collate` lays out the student's, and the aligned position pairs."""
    student_width = max(sum(len(examples[i]) for i in row) for row in micro_batch)
    pairs = [[teachers.get(examples[i].index) for i in row] for row in micro_batch]
    width = max(1, max(sum(len(t) for t in row if t is not None) for row in pairs))
    shape = (len(micro_batch), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    real = torch.zeros(shape, dtype=torch.bool)
    student_rows: list[int] = []
    teacher_rows: list[int] = []
    for b, row in enumerate(micro_batch):
        s_start, t_start = 0, 0
        for i, teacher in zip(row, pairs[b], strict=True):
            student = examples[i]
            if teacher is not None:
                stop = t_start + len(teacher)
                input_ids[b, t_start:stop] = torch.tensor(teacher.input_ids)
                position_ids[b, t_start:stop] = torch.arange(len(teacher))
                real[b, t_start:stop] = True
                s_pos, t_pos = response_positions(student), response_positions(teacher)
                n = min(len(s_pos), len(t_pos))
                student_rows += [b * student_width + s_start + p for p in s_pos[:n]]
                teacher_rows += [b * width + t_start + p for p in t_pos[:n]]
                t_start = stop
            s_start += len(student)
    return TeacherRows(
        input_ids,
        position_ids,
        real,
        torch.tensor(student_rows, dtype=torch.long),
        torch.tensor(teacher_rows, dtype=torch.long),
    )
