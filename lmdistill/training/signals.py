"""What a training step adds to a forward pass (`lmdistill.teachers.forward.Signals`): the step's
global `Counts`, and the chunked cross-entropy."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmdistill.losses import fused_sparse_distillation_loss


@dataclass
class Counts:
    """Global counts for one optimizer step: the `num_items` of every loss.

    loss_tokens: () positions with a target; tokens: () real (non-padding) tokens."""

    loss_tokens: Tensor
    tokens: Tensor


def cross_entropy(
    hidden: Tensor,
    head: Tensor,
    targets: Tensor,
    *,
    num_items: Tensor | float | None,
    weights: Tensor | None = None,
) -> Tensor:
    """Cross-entropy of the logits hidden @ head.T against targets, chunked (no (N, V) logits).

    hidden (..., H), head (V, H), targets (...) with -100 where there is no loss, weights (...)
    per-position loss weights or None (the denominator stays `num_items`). This is the hard
    term of the fused top-k loss at alpha = 0: its soft term has weight zero, so the one-token
    "teacher" it is handed (the targets themselves) never enters the value or the gradient."""
    ids = targets.clamp(min=0).unsqueeze(-1)
    return fused_sparse_distillation_loss(
        hidden,
        head,
        ids,
        torch.zeros(ids.shape, device=ids.device),
        targets,
        alpha=0.0,
        temperature=1.0,
        num_items=num_items,
        weights=weights,
    )
