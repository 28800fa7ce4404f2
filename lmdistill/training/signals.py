"""What a forward pass hands the objectives and the evaluation: `Signals` (last hidden state, LM
head, chosen layer outputs) and the step's global `Counts`; and the chunked cross-entropy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lmdistill.data.sft import Batch
from lmdistill.losses import fused_sparse_distillation_loss
from lmdistill.training.students import base_model


@dataclass
class Signals:
    """One model's forward on a batch.

    hidden: (B, T, H) the last hidden state, after the final norm.
    head: (V, H) the LM head's weight.
    layers: decoder layer index -> (B, T, H) that layer's output (only the requested layers)."""

    hidden: Tensor
    head: Tensor
    layers: dict[int, Tensor] = field(default_factory=dict)


@dataclass
class Counts:
    """Global counts for one optimizer step: the `num_items` of every loss.

    loss_tokens: () positions with a target; tokens: () real (non-padding) tokens."""

    loss_tokens: Tensor
    tokens: Tensor


def forward_signals(model: nn.Module, batch: Batch, layers: Sequence[int] = ()) -> Signals:
    """Run the decoder body of a causal LM on a packed batch, keeping the outputs of `layers`.

    No attention mask and use_cache=False: transformers then derives the block-diagonal mask of
    the packed examples from the restarting position_ids (see `lmdistill.data.sft`)."""
    hf_model = base_model(model)
    decoder = hf_model.get_decoder()
    captured: dict[int, Tensor] = {}

    def keep(index: int):
        def hook(_module, _inputs, output):
            captured[index] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [decoder.layers[i].register_forward_hook(keep(i)) for i in layers]
    try:
        out = decoder(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return Signals(out.last_hidden_state, hf_model.get_output_embeddings().weight, captured)


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
