"""Distillation objectives as pure, typed functions.

All follow one reduction rule: per-position terms summed over positions whose label is not
`ignore_index`, divided by `num_items` when given, else by the count of those positions."""

from lmdistill.losses.distill import (
    DistillSettings,
    distillation_loss,
    shift_labels,
    sparse_distillation_loss,
)
from lmdistill.losses.divergences import DIVERGENCES, LossConfigError
from lmdistill.losses.fused import (
    default_chunk_size,
    fused_distillation_loss,
    fused_sparse_distillation_loss,
)
from lmdistill.losses.hidden import HiddenProjection, hidden_state_loss
from lmdistill.losses.uld import chunked_uld_loss, uld_loss

__all__ = [
    "DIVERGENCES",
    "DistillSettings",
    "HiddenProjection",
    "LossConfigError",
    "chunked_uld_loss",
    "default_chunk_size",
    "distillation_loss",
    "fused_distillation_loss",
    "fused_sparse_distillation_loss",
    "hidden_state_loss",
    "shift_labels",
    "sparse_distillation_loss",
    "uld_loss",
]
