"""Layer-wise (hidden-state) distillation: match projected student hidden states to the teacher's.

Follows the same reduction rule as the logit losses: a per-position term, summed over positions
where `mask` is true, divided by `num_items` or the count of such positions."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmdistill.losses.distill import compute_dtype, reduce_positions
from lmdistill.losses.divergences import LossConfigError

HiddenLossKind = Literal["mse", "cosine"]


class HiddenProjection(nn.Module):
    """Learned linear map from the student's hidden size to the teacher's, owned by the trainer.

    With equal sizes it starts as the identity, so a student initialised from the teacher's layers
    starts with zero hidden-state loss instead of a random rotation (cf. TinyBERT's W_h, Jiao et al.
    2020, which is learned from a random start because the sizes differ)."""

    def __init__(self, student_dim: int, teacher_dim: int, *, bias: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(student_dim, teacher_dim, bias=bias)
        if student_dim == teacher_dim:
            with torch.no_grad():
                self.linear.weight.copy_(torch.eye(student_dim))
                if bias:
                    self.linear.bias.zero_()

    def forward(self, hidden: Tensor) -> Tensor:
        return self.linear(hidden)


def hidden_state_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    mask: Tensor | None = None,
    *,
    projection: nn.Module | None = None,
    kind: HiddenLossKind = "mse",
    num_items: int | float | Tensor | None = None,
) -> Tensor:
    """Distance between projected student and teacher hidden states.

    Args:
        student_hidden: (..., H_s).
        teacher_hidden: (..., H_t), the same positions. Never receives a gradient.
        mask: (...) bool, true where the position counts; None counts every position.
        projection: maps H_s -> H_t (e.g. `HiddenProjection`); required when H_s != H_t.
        kind: "mse" (mean over features of the squared difference) or "cosine" (1 - cosine
            similarity), per position.
        num_items: divide by this instead of the count of masked-in positions.

    Returns: scalar; the projection's parameters receive gradients.
    """
    if kind not in ("mse", "cosine"):
        raise LossConfigError(f"hidden_state_loss: kind must be 'mse' or 'cosine', got '{kind}'")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise LossConfigError(
            f"hidden_state_loss: student {tuple(student_hidden.shape)} and teacher "
            f"{tuple(teacher_hidden.shape)} hidden states must cover the same positions"
        )
    leading = student_hidden.shape[:-1]
    if mask is None:
        mask = torch.ones(leading, dtype=torch.bool, device=student_hidden.device)
    elif mask.shape != leading:
        raise LossConfigError(
            f"hidden_state_loss: mask has shape {tuple(mask.shape)}, expected {tuple(leading)}"
        )
    keep = mask.reshape(-1).bool()
    student = student_hidden.reshape(-1, student_hidden.shape[-1])[keep]
    teacher = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])[keep]
    if projection is not None:
        student = projection(student)
    if student.shape[-1] != teacher.shape[-1]:
        raise LossConfigError(
            f"hidden_state_loss: student hidden size {student.shape[-1]} != teacher hidden size "
            f"{teacher.shape[-1]}; pass a projection (e.g. HiddenProjection)"
        )
    dtype = compute_dtype(student.dtype)
    student, teacher = student.to(dtype), teacher.to(dtype)
    if kind == "mse":
        per_position = (student - teacher).pow(2).mean(-1)
    else:
        per_position = 1 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
    return reduce_positions(per_position.sum(), int(keep.sum()), num_items)
