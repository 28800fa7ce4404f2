"""Divergences between a teacher distribution p and a student distribution q, per position.

Everything here works on log-probabilities already softened by the temperature T:
    log_p = log_softmax(teacher_logits / T),  log_q = log_softmax(student_logits / T),  shape (N, V).

Two implementations of each divergence live side by side, on purpose:
- `soft_term`: the value as a plain differentiable formula (autograd takes the gradient). It is the
  reference used by `distillation_loss`.
- `soft_term_and_grad`: the value plus its analytic gradient with respect to the student's
  *tempered* logits z = s / T, used by the fused chunked loss, which never keeps a graph. It works
  in place where it can, because each extra (chunk, V) tensor is memory.
The tests check one against the other (and both against float64 formulas written in the tests).

Names say what is computed (KL(p || q) is "forward": the teacher is the reference distribution):
    forward_kl       KL(p || q)                                   mode-covering (Hinton et al. 2015)
    reverse_kl       KL(q || p)                                   mode-seeking (MiniLLM, Gu et al. 2024)
    jsd              beta KL(p || m) + (1-beta) KL(q || m), m = beta p + (1-beta) q
                     (generalized JSD, GKD: Agarwal et al. 2024; beta = 0.5 is the symmetric JSD)
    skew_forward_kl  KL(p || skew p + (1-skew) q)                  (DistiLLM, Ko et al. 2024)
    skew_reverse_kl  KL(q || skew q + (1-skew) p)                  (DistiLLM)
    tvd              0.5 sum |p - q|                              total variation distance
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from lmdistill.errors import UserError

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
DIVERGENCES: tuple[str, ...] = (
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
)

# Log-probabilities are floored here before they meet a product. exp(-1e4) is 0 in every float
# format, so terms like p * log p are unchanged where p > 0 is representable, while a -inf logit
# (a masked vocabulary entry, or a token outside a top-k teacher) gives 0 * finite = 0 instead of
# 0 * -inf = NaN in the value and in the gradient.
LOG_FLOOR = -1.0e4


class LossConfigError(UserError, ValueError):
    """Invalid loss settings or inputs (shape, vocabulary, beta, skew, temperature)."""


def check_settings(
    divergence: str, temperature: float, alpha: float, beta: float, skew: float
) -> None:
    """Raise LossConfigError naming the bad setting."""
    if divergence not in DIVERGENCES:
        raise LossConfigError(
            f"unknown divergence '{divergence}'; choose one of: {', '.join(DIVERGENCES)}"
        )
    if not (math.isfinite(temperature) and temperature > 0):
        raise LossConfigError(f"temperature must be a finite number > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise LossConfigError(f"alpha (weight of the soft term) must be in [0, 1], got {alpha}")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise LossConfigError(
            f"beta must be in (0, 1) for divergence 'jsd', got {beta} "
            "(beta -> 0 and beta -> 1 make the generalized JSD vanish; use forward_kl/reverse_kl)"
        )
    if divergence.startswith("skew_") and not 0.0 <= skew < 1.0:
        raise LossConfigError(
            f"skew must be in [0, 1) for divergence '{divergence}', got {skew} "
            "(skew = 1 compares a distribution with itself)"
        )


def _log_mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * a + (1 - weight_a) * b), computed in log space. Allocates one (N, V)."""
    if weight_a == 0.0:
        return log_b.clone()
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def rowdot(a: Tensor, b: Tensor) -> Tensor:
    """sum(a * b, -1) for (N, V) inputs without materializing the product: a batched dot."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(a.shape[0])


def soft_term(
    log_q: Tensor, log_p: Tensor, divergence: str, *, beta: float = 0.5, skew: float = 0.1
) -> Tensor:
    """Per-position divergence (N,) between teacher log-probs `log_p` (N, V) and student log-probs
    `log_q` (N, V). Differentiable through `log_q`; no temperature scaling here."""
    log_q = log_q.clamp(min=LOG_FLOOR)
    log_p = log_p.clamp(min=LOG_FLOOR)
    p, q = log_p.exp(), log_q.exp()
    if divergence == "forward_kl":
        return (p * (log_p - log_q)).sum(-1)
    if divergence == "reverse_kl":
        return (q * (log_q - log_p)).sum(-1)
    if divergence == "jsd":
        log_m = _log_mix(log_p, log_q, beta)
        return beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)
    if divergence == "skew_forward_kl":
        log_m = _log_mix(log_p, log_q, skew)
        return (p * (log_p - log_m)).sum(-1)
    if divergence == "skew_reverse_kl":
        log_m = _log_mix(log_q, log_p, skew)
        return (q * (log_q - log_m)).sum(-1)
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise LossConfigError(f"unknown divergence '{divergence}'")


def soft_term_and_grad(
    log_q: Tensor,
    log_p: Tensor,
    divergence: str,
    *,
    beta: float = 0.5,
    skew: float = 0.1,
    need_grad: bool = True,
    floor: bool = True,
    scratch: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Per-position divergence (N,) and its gradient (N, V) with respect to the student's tempered
    logits z (where log_q = log_softmax(z)).

    CONSUMES both inputs: they are overwritten in place (this is the memory-lean path). The returned
    gradient may alias `log_q`'s storage.

    Derivation: with g = dD/dq, the softmax Jacobian gives dD/dz = q * (g - sum(q * g)).
    For forward KL that simplifies to q - p.

    `floor=False` skips flooring the log-probs at LOG_FLOOR: safe (and two passes cheaper) when no
    input is -inf, e.g. log-probs of logits computed by a matmul. `scratch`, a free (N, V)
    buffer, receives p for forward KL instead of a new allocation.
    """
    if floor:
        log_q.clamp_(min=LOG_FLOOR)
        log_p.clamp_(min=LOG_FLOOR)
    if divergence == "forward_kl":
        p = torch.exp(log_p, out=scratch) if scratch is not None else log_p.exp()
        value = rowdot(p, log_p) - rowdot(p, log_q)
        if not need_grad:
            return value, None
        return value, log_q.exp_().sub_(p)  # q - p

    if divergence == "reverse_kl":
        d = log_p.neg_().add_(log_q)  # log q - log p, in log_p's storage
        q = log_q.exp_()
        value = rowdot(q, d)
        if not need_grad:
            return value, None
        return value, d.sub_(value.unsqueeze(-1)).mul_(q)  # q * (d - KL)

    if divergence == "jsd":
        log_m = _log_mix(log_p, log_q, beta)
        p = log_p.exp()
        value = beta * (rowdot(p, log_p) - rowdot(p, log_m))
        del p
        # g = dD/dq = (1 - beta) (log q - log m): the terms from m's dependence on q cancel.
        g = log_m.neg_().add_(log_q)  # log q - log m
        q = log_q.exp_()
        value = value + (1 - beta) * rowdot(q, g)
        if not need_grad:
            return value, None
        g.mul_(1 - beta)
        return value, _softmax_backward(q, g)

    if divergence == "skew_forward_kl":
        log_m = _log_mix(log_p, log_q, skew)
        p = log_p.exp()
        value = rowdot(p, log_p) - rowdot(p, log_m)
        if not need_grad:
            return value, None
        # g = -(1 - skew) p / m
        g = log_p.sub_(log_m).exp_().mul_(-(1 - skew))
        q = log_q.exp_()
        return value, _softmax_backward(q, g)

    if divergence == "skew_reverse_kl":
        log_m = _log_mix(log_q, log_p, skew)
        d = log_m.neg_().add_(log_q)  # log q - log m
        q = log_q.exp_()
        value = rowdot(q, d)
        if not need_grad:
            return value, None
        # g = log q + 1 - log m - skew q / m; the constant 1 cancels in the softmax backward.
        g = log_p.copy_(d).exp_().mul_(-skew).add_(d)  # reuse log_p's storage for q / m
        return value, _softmax_backward(q, g)

    if divergence == "tvd":
        p = log_p.exp_()
        q = log_q.exp_()
        diff = q.sub(p)
        value = 0.5 * diff.abs().sum(-1)
        if not need_grad:
            return value, None
        g = diff.sign_().mul_(0.5)
        return value, _softmax_backward(q, g)

    raise LossConfigError(f"unknown divergence '{divergence}'")


def _softmax_backward(q: Tensor, g: Tensor) -> Tensor:
    """dD/dz = q * (g - sum(q * g)) for z -> q = softmax(z); writes into g's storage."""
    return g.sub_(rowdot(q, g).unsqueeze(-1)).mul_(q)
