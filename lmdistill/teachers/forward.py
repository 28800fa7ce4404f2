"""One causal LM's forward on a packed batch: `Signals` (last hidden state, LM head, chosen layer
outputs). The teacher's side of the offline cache and the student's side of training both read
a model through it, so it lives with the teachers, below training."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from lmdistill.data.sft import Batch


@dataclass
class Signals:
    """One model's forward on a batch.

    hidden: (B, T, H) the last hidden state, after the final norm.
    head: (V, H) the LM head's weight.
    layers: decoder layer index -> (B, T, H) that layer's output (only the requested layers)."""

    hidden: Tensor
    head: Tensor
    layers: dict[int, Tensor] = field(default_factory=dict)


def base_model(model):
    """The HF model under a PEFT wrapper (LoRA layers stay injected in it), or `model` itself."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


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
