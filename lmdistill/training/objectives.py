"""Training objectives: small strategies the loop combines by weights.

Every objective reads the same forward outputs (`Signals`) and follows the losses' one reduction
rule with the step's GLOBAL counts (`Counts`: over all micro-batches of the optimizer step and all
processes), so a step's gradient is the same however it is split into micro-batches and processes.

    sft      cross-entropy on assistant tokens
    logits   KD on the teacher's distribution, online (teacher hidden states + LM head, fused: the
             (tokens, V) logits are never materialized) or from an offline top-k cache
    hidden   hidden-state KD through learned projections on mapped layer pairs
    uld      Universal Logit Distillation from a teacher with another tokenizer (sorted-probability
             L1 on response positions aligned by index) mixed with CE

Decoder bodies are called directly (`model.get_decoder()`), so the forward returns the final,
normed hidden state and the LM head is applied chunk by chunk inside the fused losses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lmdistill.data.sft import Batch
from lmdistill.errors import UserError
from lmdistill.losses import (
    HiddenProjection,
    fused_distillation_loss,
    fused_sparse_distillation_loss,
    hidden_state_loss,
)
from lmdistill.losses.uld import chunked_uld_loss
from lmdistill.teachers.forward import Signals, forward_signals
from lmdistill.training.config import (
    HiddenObjective,
    LogitsObjective,
    SftObjective,
    UldObjective,
)
from lmdistill.training.evaluate import batch_sums
from lmdistill.training.signals import Counts, cross_entropy


class Sft(nn.Module):
    """Cross-entropy on the assistant tokens."""

    student_layers: tuple[int, ...] = ()
    teacher_layers: tuple[int, ...] = ()
    needs_teacher = False

    def __init__(self, settings: SftObjective) -> None:
        super().__init__()
        self.settings = settings

    def forward(
        self, batch: Batch, student: Signals, teacher: Signals | None, counts: Counts
    ) -> Tensor:
        return cross_entropy(
            student.hidden,
            student.head,
            batch.targets,
            num_items=counts.loss_tokens,
            weights=batch.weights,
        )


class Logits(nn.Module):
    """alpha * T^2 * D(teacher || student) + (1 - alpha) * CE, on the assistant tokens.

    On the student's own samples (an on-policy step, `batch.sampled`) alpha is 1: cross-entropy
    on them would only reinforce the student's choices; GKD (arXiv:2306.13649) trains on the
    divergence alone there."""

    student_layers: tuple[int, ...] = ()
    teacher_layers: tuple[int, ...] = ()

    def __init__(self, settings: LogitsObjective, *, cached: bool) -> None:
        super().__init__()
        self.settings = settings
        self.cached = cached
        self.needs_teacher = not cached

    def forward(
        self, batch: Batch, student: Signals, teacher: Signals | None, counts: Counts
    ) -> Tensor:
        s = self.settings
        common = dict(
            divergence=s.divergence,
            temperature=s.temperature,
            alpha=1.0 if batch.sampled else s.alpha,
            beta=s.beta,
            skew=s.skew,
            num_items=counts.loss_tokens,
            weights=batch.weights,
        )
        if self.cached:
            return fused_sparse_distillation_loss(
                student.hidden,
                student.head,
                batch.teacher_ids,
                batch.teacher_logprobs,
                batch.targets,
                **common,
            )
        return fused_distillation_loss(
            student.hidden, student.head, teacher.hidden, teacher.head, batch.targets, **common
        )


def default_layer_map(
    student_layers: int, teacher_layers: int, source: Sequence[int] | None = None
) -> dict[int, int]:
    """Student layer i <- teacher layer source[i] when the student was copied from those teacher
    layers, else round(i * (L_t - 1) / (L_s - 1)): first to first, last to last, evenly between
    (the uniform mapping of TinyBERT, Jiao et al. 2020, and Minitron's depth-pruned students)."""
    if source is not None and len(source) == student_layers and max(source) < teacher_layers:
        return {i: int(j) for i, j in enumerate(source)}
    if student_layers == 1:
        return {0: teacher_layers - 1}
    return {
        i: round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)
    }


class Hidden(nn.Module):
    """Mean over mapped layer pairs of hidden_state_loss(projection(student layer), teacher layer),
    on every real token. Averaging over pairs keeps the weight's meaning independent of depth."""

    needs_teacher = True

    def __init__(
        self,
        settings: HiddenObjective,
        layer_map: dict[int, int],
        student_dim: int,
        teacher_dim: int,
    ) -> None:
        super().__init__()
        if not layer_map:
            raise UserError("hidden-state KD: the layer map is empty")
        self.settings = settings
        self.layer_map = dict(sorted(layer_map.items()))
        self.student_layers = tuple(self.layer_map)
        self.teacher_layers = tuple(sorted(set(self.layer_map.values())))
        self.projections = nn.ModuleDict(
            {str(s): HiddenProjection(student_dim, teacher_dim) for s in self.layer_map}
        )

    def forward(
        self, batch: Batch, student: Signals, teacher: Signals | None, counts: Counts
    ) -> Tensor:
        losses = [
            hidden_state_loss(
                student.layers[s],
                teacher.layers[t],
                batch.real,
                projection=self.projections[str(s)],
                kind=self.settings.loss,
                num_items=counts.tokens,
            )
            for s, t in self.layer_map.items()
        ]
        return torch.stack(losses).mean()


def check_layer_map(layer_map: dict[int, int], student_layers: int, teacher_layers: int) -> None:
    for s, t in layer_map.items():
        if not 0 <= s < student_layers:
            raise UserError(
                f"hidden-state KD: layer_map key {s} is not a student layer (0..{student_layers - 1})"
            )
        if not 0 <= t < teacher_layers:
            raise UserError(
                f"hidden-state KD: layer_map value {t} is not a teacher layer (0..{teacher_layers - 1})"
            )


class Uld(nn.Module):
    """alpha * ULD(teacher, student) + (1 - alpha) * CE on the student's own tokens, for a teacher
    with another tokenizer (Boizard et al. 2024, arXiv:2402.12030; `lmdistill.losses.uld`).

    The teacher's signals are a `CrossTokenizerTeacher`'s: its hidden states at the aligned
    response positions only, (M, Ht), paired with the student positions
    `batch.teacher_side.student_rows`. Both terms divide by the step's global count of the
    student's response tokens, so alpha mixes two per-token averages (positions beyond the shorter
    response add nothing to the ULD sum)."""

    student_layers: tuple[int, ...] = ()
    teacher_layers: tuple[int, ...] = ()
    needs_teacher = True

    def __init__(self, settings: UldObjective) -> None:
        super().__init__()
        self.settings = settings

    def forward(
        self, batch: Batch, student: Signals, teacher: Signals | None, counts: Counts
    ) -> Tensor:
        s = self.settings
        total = student.hidden.new_zeros((), dtype=torch.float32)
        if s.alpha < 1:
            ce = cross_entropy(
                student.hidden,
                student.head,
                batch.targets,
                num_items=counts.loss_tokens,
                weights=batch.weights,
            )
            total = total + (1 - s.alpha) * ce
        if s.alpha > 0:
            if teacher is None or batch.teacher_side is None:
                raise UserError(
                    "uld: the batch has no teacher-side rows (no cross-tokenizer teacher)"
                )
            hidden = student.hidden.reshape(-1, student.hidden.shape[-1])
            uld = chunked_uld_loss(
                hidden[batch.teacher_side.student_rows],
                student.head,
                teacher.hidden,
                teacher.head,
                temperature=s.temperature,
                top_k=s.top_k,
                num_items=counts.loss_tokens,
            )
            total = total + s.alpha * uld
        return total


class DistillModule(nn.Module):
    """The student plus the objectives' own parameters (hidden-state projections): the one module
    the loop trains and Accelerate wraps (DDP/FSDP), so every loss is computed inside its forward."""

    def __init__(
        self, student: nn.Module, objectives: dict[str, nn.Module], weights: dict[str, float]
    ) -> None:
        super().__init__()
        self.student = student
        self.objectives = nn.ModuleDict(objectives)
        self.weights = weights
        self.student_layers = sorted({i for o in objectives.values() for i in o.student_layers})

    def forward(
        self, batch: Batch, teacher: Signals | None, counts: Counts | None = None
    ) -> tuple[Tensor, dict[str, Tensor]] | Tensor:
        """With `counts`: (weighted total loss, each objective's unweighted loss). Without: the
        held-out sums of `evaluate.batch_sums`. Evaluation runs through this forward too, so a
        sharding wrapper (FSDP) has gathered the weights it reads, LM head included."""
        if counts is None:
            return batch_sums(forward_signals(self.student, batch), batch, teacher)
        student = forward_signals(self.student, batch, self.student_layers)
        parts = {
            name: objective(batch, student, teacher, counts)
            for name, objective in self.objectives.items()
        }
        total = sum(self.weights[name] * value for name, value in parts.items())
        return total, parts


class OnlineTeacher:
    """A local teacher model run without gradients on each batch."""

    def __init__(self, model: nn.Module, layers: Sequence[int]) -> None:
        self.model = model.eval().requires_grad_(False)
        self.layers = tuple(layers)

    @torch.no_grad()
    def __call__(self, batch: Batch) -> Signals:
        return forward_signals(self.model, batch, self.layers)
