"""The teacher of a cross-tokenizer (ULD) run: its own model and tokenizer, its own tokenization of
every training example, and a forward on the teacher-side rows of each batch that returns its final
hidden states at the aligned response positions only.

Only training batches carry teacher-side rows; held-out evaluation reports the student's
cross-entropy on its own tokens (there is no shared vocabulary for a KL or top-1 agreement)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lmdistill.data.cross_tokenizer import (
    TeacherRows,
    aligned_fraction,
    collate_teacher,
    load_teacher_examples,
)
from lmdistill.data.records import field_map
from lmdistill.data.sft import Batch, Example, MicroBatch, check_packing
from lmdistill.errors import UserError
from lmdistill.teachers.forward import Signals, forward_signals
from lmdistill.training.config import TrainConfig, UldObjective


class CrossTokenizerTeacher:
    """A local teacher model with its own tokenizer, run without gradients.

    `examples`: the teacher's tokenization of the training file, keyed by record index."""

    aligned_fraction: float | None = None  # share of the student's response positions paired

    def __init__(self, model: nn.Module, tokenizer, examples: Mapping[int, Example]) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.examples = examples
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else 0
        # Embedding matrices are often padded past the tokenizer (to a multiple of 64 or 128); those
        # rows are never real tokens, and ULD sorts the whole vocabulary, so they are cut off.
        self.vocab = len(tokenizer)

    def rows(self, examples: Sequence[Example], micro_batch: MicroBatch) -> TeacherRows:
        """The teacher-side rows of a student micro-batch (see `data.cross_tokenizer`)."""
        return collate_teacher(examples, self.examples, micro_batch, self.pad_id)

    @torch.no_grad()
    def __call__(self, batch: Batch) -> Signals:
        """Signals with hidden (M, Ht): the teacher's final hidden states at the M aligned response
        positions (in the order of `batch.teacher_side.student_rows`), and head (V, Ht)."""
        side = batch.teacher_side
        if side is None:
            raise UserError("internal: a ULD batch was built without the teacher's tokenization")
        out = forward_signals(self.model, side)  # TeacherRows has input_ids and position_ids
        hidden = out.hidden.reshape(-1, out.hidden.shape[-1])[side.teacher_rows]
        head = out.head[: self.vocab] if out.head.shape[0] > self.vocab else out.head
        return Signals(hidden, head)


def load_cross_teacher(
    config: TrainConfig, device: torch.device, students: Sequence[Example]
) -> CrossTokenizerTeacher | None:
    """The ULD teacher of `config` (None without a uld objective): the teacher model and ITS OWN
    tokenizer (from the teacher's model dir), and its tokenization of the training file."""
    if not any(isinstance(o, UldObjective) for o in config.objectives):
        return None
    from lmdistill.teachers.local import resolve_dtype
    from lmdistill.teachers.registry import is_api_spec
    from lmdistill.training.students import load_model_dir, resolve_model_dir

    spec = config.teacher
    if is_api_spec(spec.model):
        raise UserError(
            f"uld: teacher '{spec.model}' is an API; ULD needs a local model's full logits"
        )
    # The model dir is loaded directly rather than through HFTeacher, which needs a chat template:
    # a base model without one gets the plain transcript template (data.cross_tokenizer).
    model, tokenizer = load_model_dir(
        resolve_model_dir(spec.model), dtype=resolve_dtype(spec.dtype, device)
    )
    model.to(device)
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"uld: teacher '{spec.model}' needs a fast (Rust) tokenizer")
    if config.batch.packing:
        # Half-precision logits differ by more than float32's tolerance between any two runs.
        check_packing(model, atol=1e-4 if model.dtype == torch.float32 else 3e-2)
    data = config.data
    examples = load_teacher_examples(
        data.path,
        tokenizer,
        max_length=data.max_length,
        split=data.split,
        fields=field_map(data.fields),
    )
    cross = CrossTokenizerTeacher(model, tokenizer, examples)
    cross.aligned_fraction = aligned_fraction(students, examples)
    return cross
