"""Logit distillation losses on materialized logits.

The one reduction rule (every loss in lmdistill follows it): per-position terms are summed over the
positions whose label is not `ignore_index`, then divided by `num_items` when given, else by the
count of such positions. Padding, how a batch is split, and gradient accumulation therefore never
change the value. The often-copied `F.kl_div(..., reduction="batchmean")` on (B, T, V) logits
divides by B only and counts padding positions; this does neither.

Alignment: `logits[i]` predicts `labels[i]`. For a causal LM, shift the labels with
`shift_labels` (no copy of the logits is made).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lmdistill.losses.divergences import (
    LOG_FLOOR,
    LossConfigError,
    check_settings,
    soft_term,
)


@dataclass(frozen=True)
class DistillSettings:
    """The keyword arguments every logit-distillation loss shares (see `distillation_loss`)."""

    divergence: str = "forward_kl"
    temperature: float = 2.0
    alpha: float = 0.5
    beta: float = 0.5
    skew: float = 0.1
    ignore_index: int = -100

    def __post_init__(self) -> None:
        check_settings(self.divergence, self.temperature, self.alpha, self.beta, self.skew)


def shift_labels(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Align causal-LM labels with logits: out[..., t] = labels[..., t + 1], the last position gets
    `ignore_index`. Shape (..., T) -> (..., T). Shifting labels instead of slicing logits avoids a
    copy of the (B, T, V) logits."""
    pad = torch.full_like(labels[..., :1], ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 stays float64 (so gradcheck works)."""
    return torch.promote_types(dtype, torch.float32)


def denominator(count: int, num_items: int | float | Tensor | None, like: Tensor) -> Tensor | float:
    """What the summed loss is divided by: `num_items` when given, else the count of valid
    positions (at least 1, so an all-padding batch gives 0 rather than NaN)."""
    if num_items is None:
        return float(max(int(count), 1))
    if isinstance(num_items, Tensor):
        return num_items.to(device=like.device, dtype=like.dtype)
    if num_items <= 0:
        raise LossConfigError(f"num_items must be > 0, got {num_items}")
    return float(num_items)


def reduce_positions(total: Tensor, count: int, num_items: int | float | Tensor | None) -> Tensor:
    """The one reduction rule: sum over unmasked positions / (num_items or their count)."""
    return total / denominator(count, num_items, total)


def check_labels(labels: Tensor, leading_shape: torch.Size, vocab: int, name: str) -> None:
    if labels.shape != leading_shape:
        raise LossConfigError(
            f"{name}: labels have shape {tuple(labels.shape)} but the logits' leading shape is "
            f"{tuple(leading_shape)}; labels[i] must be the target of logits[i]"
        )
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise LossConfigError(f"{name}: labels must be an integer tensor, got {labels.dtype}")
    # The bounds check reads the labels' values; on an accelerator that would synchronize the
    # device every step, so it is done on CPU tensors only (CUDA's own kernels assert there).
    if labels.device.type == "cpu" and labels.numel():
        valid = labels[labels >= 0]
        if valid.numel() and int(valid.max()) >= vocab:
            raise LossConfigError(
                f"{name}: a label ({int(valid.max())}) is outside the vocabulary (size {vocab})"
            )


def check_weights(weights: Tensor | None, labels: Tensor, name: str) -> None:
    if weights is None:
        return
    if weights.shape != labels.shape:
        raise LossConfigError(
            f"{name}: weights have shape {tuple(weights.shape)}, the labels {tuple(labels.shape)}; "
            "weights[i] scales the loss of position i"
        )
    if not weights.is_floating_point():
        raise LossConfigError(f"{name}: weights must be floating point, got {weights.dtype}")


def weighted(per_row: Tensor, weights: Tensor | None) -> Tensor:
    """Per-row terms (K,) scaled by their rows' weights (K,), or unchanged without weights."""
    return per_row if weights is None else per_row * weights


def hard_term(student: Tensor, labels: Tensor) -> Tensor:
    """Per-position cross-entropy at T = 1, (N, V), (N,) -> (N,)."""
    return F.cross_entropy(student, labels, reduction="none")


def _combine(
    student: Tensor,
    log_p: Tensor,
    labels: Tensor,
    s: DistillSettings,
    num_items: int | float | Tensor | None,
    weights: Tensor | None = None,
) -> Tensor:
    """alpha * T^2 * soft + (1 - alpha) * hard over valid rows (student (K, V) in compute dtype,
    teacher log-probs at temperature T (K, V), labels (K,), optional row weights (K,)), reduced
    by the one rule."""
    total = student.new_zeros(())
    if s.alpha > 0:
        log_q = F.log_softmax(student / s.temperature, dim=-1)
        soft = soft_term(log_q, log_p, s.divergence, beta=s.beta, skew=s.skew)
        # T^2 keeps the soft gradients' scale independent of T (Hinton et al. 2015, sec. 2).
        total = total + s.alpha * s.temperature**2 * weighted(soft, weights).sum()
    if s.alpha < 1:
        total = total + (1 - s.alpha) * weighted(hard_term(student, labels), weights).sum()
    return reduce_positions(total, labels.numel(), num_items)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 2.0,
    alpha: float = 0.5,
    beta: float = 0.5,
    skew: float = 0.1,
    ignore_index: int = -100,
    num_items: int | float | Tensor | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """alpha * T^2 * D(p, q) + (1 - alpha) * CE(student, labels), per the one reduction rule.

    Args:
        student_logits: (..., V) student logits, any float dtype (computed in float32 or wider).
        teacher_logits: (..., V) teacher logits on the same positions. Never receives a gradient.
        labels: (...) integer targets; `labels[i]` is the target of `logits[i]`. Positions equal to
            `ignore_index` change neither the value nor any gradient, whatever their logits hold.
        divergence: one of `DIVERGENCES`, between p = softmax(teacher / T) and
            q = softmax(student / T); see `lmdistill.losses.divergences` for the formulas.
        temperature: T > 0. The soft term is multiplied by T^2 for every divergence.
        alpha: weight of the soft term; the hard term (CE at T = 1) gets 1 - alpha.
        beta: the generalized JSD's mixing weight, in (0, 1).
        skew: the skew KLs' mixing weight, in [0, 1).
        num_items: divide by this instead of the local count of valid positions (the global count
            across gradient-accumulation steps and processes).
        weights: (...) float, like `labels`: each position's loss (soft and hard term) is
            multiplied by its weight (e.g. reasoning vs final-answer tokens). The denominator is
            unchanged (still the count of valid positions, or `num_items`), so a weight scales a
            token's share of the loss instead of renormalizing; None equals all ones.

    Returns: a scalar tensor in the compute dtype.
    """
    s = DistillSettings(divergence, temperature, alpha, beta, skew, ignore_index)
    _check_pair(student_logits, teacher_logits, "distillation_loss")
    vocab = student_logits.shape[-1]
    check_labels(labels, student_logits.shape[:-1], vocab, "distillation_loss")
    check_weights(weights, labels, "distillation_loss")
    valid = labels.reshape(-1) != ignore_index
    dtype = compute_dtype(student_logits.dtype)
    # Selecting the valid rows first means masked rows never enter a computation: they cannot
    # leak NaN/inf into the value, and their gradient is exactly zero.
    student = student_logits.reshape(-1, vocab)[valid].to(dtype)
    with torch.no_grad():
        teacher = teacher_logits.detach().reshape(-1, vocab)[valid].to(dtype)
        log_p = F.log_softmax(teacher / temperature, dim=-1)
    w = None if weights is None else weights.reshape(-1)[valid].to(dtype)
    return _combine(student, log_p, labels.reshape(-1)[valid].long(), s, num_items, w)


def sparse_teacher_log_probs(
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    vocab: int,
    temperature: float,
    dtype: torch.dtype,
    out: Tensor | None = None,
) -> Tensor:
    """Dense (K, V) teacher log-probs at temperature T from a top-k teacher (into `out` if given).

    Semantics: the teacher's top-k log-probs (at T = 1, as an API or cache gives them) are divided
    by T and renormalised over the k tokens; every other token has probability 0. This equals
    softmax(teacher_logits / T) restricted to the top-k set, so with k = V it is the dense teacher.
    Padding entries (fewer than k tokens known) carry log-prob -inf and any valid id; they get no
    mass even if their id repeats a real one (hence the max-reduction in the scatter).
    """
    tl = teacher_logprobs.to(dtype) / temperature
    # A row with no known token (all -inf) keeps zero mass instead of becoming NaN.
    tl = tl - torch.logsumexp(tl, dim=-1, keepdim=True).clamp_(min=LOG_FLOOR)
    if out is None:
        out = torch.full((tl.shape[0], vocab), LOG_FLOOR, dtype=dtype, device=tl.device)
    else:
        out.fill_(LOG_FLOOR)
    return out.scatter_reduce_(1, teacher_ids.long(), tl, reduce="amax", include_self=True)


# A top-k teacher puts zero mass outside its k tokens. Divergences that weigh the teacher by the
# student's mass there (q * log(q / p)) are infinite, so they are refused rather than faked.
SPARSE_UNSUPPORTED = ("reverse_kl",)


def check_sparse_inputs(
    teacher_ids: Tensor, teacher_logprobs: Tensor, rows_shape: torch.Size, vocab: int, name: str
) -> None:
    if teacher_ids.shape != teacher_logprobs.shape:
        raise LossConfigError(
            f"{name}: teacher_ids {tuple(teacher_ids.shape)} and teacher_logprobs "
            f"{tuple(teacher_logprobs.shape)} must have the same shape (..., k)"
        )
    if teacher_ids.shape[:-1] != rows_shape:
        raise LossConfigError(
            f"{name}: teacher top-k has leading shape {tuple(teacher_ids.shape[:-1])}, "
            f"student has {tuple(rows_shape)}"
        )
    if teacher_ids.shape[-1] < 1 or teacher_ids.shape[-1] > vocab:
        raise LossConfigError(f"{name}: k must be in [1, {vocab}], got {teacher_ids.shape[-1]}")
    if teacher_ids.device.type == "cpu" and teacher_ids.numel():
        lo, hi = int(teacher_ids.min()), int(teacher_ids.max())
        if lo < 0 or hi >= vocab:
            raise LossConfigError(
                f"{name}: teacher ids must be in [0, {vocab}), got values in [{lo}, {hi}]"
            )


def check_sparse_divergence(divergence: str, skew: float, name: str) -> None:
    if divergence in SPARSE_UNSUPPORTED or (divergence == "skew_reverse_kl" and skew == 0):
        raise LossConfigError(
            f"{name}: divergence '{divergence}' is infinite against a top-k teacher (zero "
            "probability outside its k tokens); use forward_kl, jsd, skew_forward_kl, "
            "skew_reverse_kl with skew > 0, or tvd"
        )


def sparse_distillation_loss(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    labels: Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 2.0,
    alpha: float = 0.5,
    beta: float = 0.5,
    skew: float = 0.1,
    ignore_index: int = -100,
    num_items: int | float | Tensor | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """`distillation_loss` against a teacher given as its top-k tokens.

    Args:
        student_logits: (..., V).
        teacher_ids: (..., k) token ids of the teacher's top-k at each position.
        teacher_logprobs: (..., k) their log-probabilities at T = 1 (-inf marks padding).
        labels, and the keyword arguments: as in `distillation_loss`.

    See `sparse_teacher_log_probs` for the semantics; with k = V this equals `distillation_loss`.
    reverse_kl (and skew_reverse_kl with skew = 0) are refused: they are infinite against a
    teacher with zero mass outside its top-k.
    """
    s = DistillSettings(divergence, temperature, alpha, beta, skew, ignore_index)
    if alpha > 0:
        check_sparse_divergence(divergence, skew, "sparse_distillation_loss")
    vocab = student_logits.shape[-1]
    check_labels(labels, student_logits.shape[:-1], vocab, "sparse_distillation_loss")
    check_weights(weights, labels, "sparse_distillation_loss")
    check_sparse_inputs(
        teacher_ids, teacher_logprobs, student_logits.shape[:-1], vocab, "sparse_distillation_loss"
    )
    valid = labels.reshape(-1) != ignore_index
    dtype = compute_dtype(student_logits.dtype)
    k = teacher_ids.shape[-1]
    student = student_logits.reshape(-1, vocab)[valid].to(dtype)
    with torch.no_grad():
        log_p = sparse_teacher_log_probs(
            teacher_ids.reshape(-1, k)[valid],
            teacher_logprobs.detach().reshape(-1, k)[valid],
            vocab,
            temperature,
            dtype,
        )
    w = None if weights is None else weights.reshape(-1)[valid].to(dtype)
    return _combine(student, log_p, labels.reshape(-1)[valid].long(), s, num_items, w)


def _check_pair(student: Tensor, teacher: Tensor, name: str) -> None:
    if student.shape[-1] != teacher.shape[-1]:
        raise LossConfigError(
            f"{name}: student vocabulary ({student.shape[-1]}) and teacher vocabulary "
            f"({teacher.shape[-1]}) differ; logit distillation needs a shared vocabulary (slice "
            "padded vocab rows to the tokenizer's size, or use cross-tokenizer distillation)"
        )
    if student.shape != teacher.shape:
        raise LossConfigError(
            f"{name}: student logits {tuple(student.shape)} and teacher logits "
            f"{tuple(teacher.shape)} must have the same shape"
        )
    if not student.is_floating_point() or not teacher.is_floating_point():
        raise LossConfigError(f"{name}: logits must be floating point")
