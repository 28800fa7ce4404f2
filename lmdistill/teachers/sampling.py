"""Sampling arithmetic shared by every place that draws tokens from a model's distribution
(the server's per-row sampler, on-policy distillation's proposals)."""

from __future__ import annotations

from torch import Tensor


def top_p_filter(probs: Tensor, top_p: float) -> Tensor:
    """`probs` (..., V) cut to the nucleus `top_p`: the smallest set of most likely tokens whose
    mass reaches top_p (a token stays if the mass before it is below top_p, so the most likely
    one always stays); the rest set to 0, NOT renormalised (torch.multinomial does not need it)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
    return probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
