"""Fused linear + distillation loss: never holds more than one chunk of (rows, V) logits.

At 8,192 tokens x 128,256 vocab a float32 logits tensor is 4 GiB; the textbook loss holds several
(student and teacher logits, their softmaxes, the autograd saves). This module takes the last
hidden states and the LM-head weights instead, and walks the rows in chunks:

    for each chunk:  logits = hidden @ W.T  ->  value and d(loss)/d(logits) in closed form
                     grad_hidden[chunk] = dlogits @ W ;  grad_W += dlogits.T @ hidden[chunk]

The gradients are computed during the forward pass (the chunk's logits are freed at once), so the
backward only scales two stored tensors, the size of the inputs, by the incoming gradient. Nothing
per-chunk outlives its iteration. The analytic gradients are in `divergences.soft_term_and_grad`;
tests compare them with autograd on `distillation_loss`.

The idea of chunking the LM head with precomputed gradients is the one behind Liger-Kernel's fused
linear losses (Hsu et al. 2024, arXiv:2410.10989); this implementation is plain PyTorch and also
skips the masked rows entirely (padding costs no compute).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmdistill.losses.distill import (
    DistillSettings,
    check_labels,
    check_sparse_divergence,
    check_sparse_inputs,
    check_weights,
    compute_dtype,
    denominator,
    sparse_teacher_log_probs,
)
from lmdistill.losses.divergences import LossConfigError, soft_term_and_grad

# Elements of one (rows, V) workspace buffer. Four such buffers are reused across chunks (allocated
# once per call: a fresh large allocation costs page faults every time, ~2.5x the work of the op that
# fills it on CPU), so the working set is 4 * 2**24 * 4 bytes = 256 MiB in float32 for vocabularies
# up to 64k. Below MIN_CHUNK_ROWS rows the LM-head matmuls lose efficiency (measured on 2 CPU cores:
# 128 rows ~70%, 256 ~80%, 512+ ~95% of the large-matrix FLOP rate), so large vocabularies get
# MIN_CHUNK_ROWS rows and a larger workspace (1 GiB at V=262k). See bench/loss_memory.py.
DEFAULT_CHUNK_ELEMENTS = 2**24
MIN_CHUNK_ROWS = 256


def default_chunk_size(vocab: int) -> int:
    """Rows per chunk for a vocabulary size: ~DEFAULT_CHUNK_ELEMENTS logits, at least 256 rows."""
    return max(MIN_CHUNK_ROWS, DEFAULT_CHUNK_ELEMENTS // vocab)


class _Workspace:
    """Four (rows, V) buffers in the compute dtype, reused by every chunk of one call."""

    def __init__(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> None:
        self.buffers = [torch.empty(rows, vocab, dtype=dtype, device=device) for _ in range(4)]

    def take(self, rows: int) -> list[Tensor]:
        return [b[:rows] for b in self.buffers]


def rows_loss_and_grad(
    z: Tensor,
    log_p: Tensor,
    labels: Tensor,
    s: DistillSettings,
    scratch: tuple[Tensor, Tensor],
    *,
    need_grad: bool,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Sum over rows of w * (alpha * T^2 * D + (1 - alpha) * CE), and its gradient w.r.t. the
    student's logits s = T * z.

    z (C, V): the student's tempered logits s / T; log_p (C, V): the teacher's log-probs at T;
    scratch: two free (C, V) buffers. All four are overwritten. labels (C,) int64; weights (C,)
    in z's dtype, or None for all ones.
    Returns (sum (), grad (C, V) or None); grad lives in one of the given buffers. Written to touch
    each (C, V) element as few times as possible: after the matmuls, elementwise passes and
    allocations are what cost.
    """
    total = z.new_zeros(())
    log_q = torch.log_softmax(z, dim=-1, out=scratch[0]) if s.alpha > 0 else None
    hard: Tensor | None = None
    if s.alpha < 1:
        # Cross-entropy at T = 1 from log_softmax(T * z); z is not needed after this.
        s_logits = z if s.temperature == 1 else z.mul_(s.temperature)
        hard = torch.log_softmax(s_logits, dim=-1, out=scratch[1])
        picked = hard.gather(1, labels.unsqueeze(1))
        if weights is not None:
            picked = picked * weights.unsqueeze(1)
        total -= (1 - s.alpha) * picked.sum()
    grad: Tensor | None = None
    if log_q is not None:
        # z is free by now: forward KL writes p into it instead of allocating.
        soft, dz = soft_term_and_grad(
            log_q,
            log_p,
            s.divergence,
            beta=s.beta,
            skew=s.skew,
            need_grad=need_grad,
            floor=False,
            scratch=z,
        )
        total += s.alpha * s.temperature**2 * (soft if weights is None else soft * weights).sum()
        if dz is not None:
            grad = dz.mul_(s.alpha * s.temperature)  # d/ds = T^2 * dD/dz * (1 / T)
    if need_grad and hard is not None:
        # d CE / ds = softmax(s) - onehot(label).
        probs = hard.exp_()
        grad = probs.mul_(1 - s.alpha) if grad is None else grad.add_(probs, alpha=1 - s.alpha)
        grad.scatter_add_(1, labels.unsqueeze(1), grad.new_full((grad.shape[0], 1), -(1 - s.alpha)))
    if grad is not None and weights is not None:
        grad.mul_(weights.unsqueeze(1))  # each row's loss is scaled, so is its gradient
    return total, grad


@dataclass
class _DenseTeacher:
    hidden: Tensor  # (K, H_t), valid rows only
    weight: Tensor  # (V, H_t)

    def log_probs(
        self, start: int, stop: int, temperature: float, out: Tensor, tmp: Tensor
    ) -> Tensor:
        """Teacher log-probs at T for rows [start, stop) into `out`; `tmp` is scratch."""
        # (h / T) @ W.T == logits / T, with the division on (C, H) instead of (C, V).
        _matmul_into(self.hidden[start:stop] / temperature, self.weight, tmp)
        return torch.log_softmax(tmp, dim=-1, out=out)


@dataclass
class _SparseTeacher:
    ids: Tensor  # (K, k)
    logprobs: Tensor  # (K, k)
    vocab: int

    def log_probs(
        self, start: int, stop: int, temperature: float, out: Tensor, tmp: Tensor
    ) -> Tensor:
        return sparse_teacher_log_probs(
            self.ids[start:stop],
            self.logprobs[start:stop],
            self.vocab,
            temperature,
            out.dtype,
            out=out,
        )


def _matmul_into(x: Tensor, weight: Tensor, out: Tensor) -> Tensor:
    """out = x @ weight.T, written into `out` (compute dtype) without a temporary when dtypes match."""
    if x.dtype == out.dtype and weight.dtype == out.dtype:
        return torch.mm(x, weight.T, out=out)
    return out.copy_(x @ weight.T)


def _fused_forward(
    hidden: Tensor,
    weight: Tensor,
    teacher: _DenseTeacher | _SparseTeacher,
    labels: Tensor,
    s: DistillSettings,
    chunk_size: int,
    need_hidden_grad: bool,
    need_weight_grad: bool,
    row_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Loss sum over valid rows and un-normalised gradients. hidden (K, H), labels (K,),
    row_weights (K,) in the compute dtype or None."""
    dtype = compute_dtype(hidden.dtype)
    device = hidden.device
    need_grad = need_hidden_grad or need_weight_grad
    total = torch.zeros((), dtype=dtype, device=device)
    grad_hidden = (
        torch.empty(hidden.shape, dtype=dtype, device=device) if need_hidden_grad else None
    )
    # The weight gradient accumulates in the compute dtype even for bf16 weights: summing many
    # chunks in bf16 would lose the small ones.
    grad_weight = (
        torch.zeros(weight.shape, dtype=dtype, device=device) if need_weight_grad else None
    )
    rows = min(chunk_size, max(hidden.shape[0], 1))
    workspace = _Workspace(rows, weight.shape[0], dtype, device)
    for start in range(0, hidden.shape[0], chunk_size):
        stop = min(start + chunk_size, hidden.shape[0])
        h = hidden[start:stop]
        z_buf, log_p_buf, a, b = workspace.take(stop - start)
        log_p = teacher.log_probs(start, stop, s.temperature, out=log_p_buf, tmp=a)
        z = _matmul_into(h / s.temperature, weight, z_buf)  # student logits / T
        chunk_total, g = rows_loss_and_grad(
            z,
            log_p,
            labels[start:stop],
            s,
            (a, b),
            need_grad=need_grad,
            weights=None if row_weights is None else row_weights[start:stop],
        )
        total += chunk_total
        if g is None:
            continue
        # Matmuls run in the weights' dtype (bf16 on accelerators), accumulation in `dtype`.
        g_mm = g if g.dtype == weight.dtype else g.to(weight.dtype)
        if grad_hidden is not None:
            _matmul_into(g_mm, weight.T, grad_hidden[start:stop])
        if grad_weight is not None:
            if g_mm.dtype == dtype:
                grad_weight.addmm_(g_mm.T, h)
            else:
                grad_weight.add_(g_mm.T @ h)
    return total, grad_hidden, grad_weight


class _FusedLinearDistill(torch.autograd.Function):
    """Returns the loss; gradients were computed in forward and are only scaled in backward.

    The stored gradients are handed over (not copied) on the first backward, so autograd can take
    them as `.grad` without a second V x H copy, and a loss tensor kept alive after backward does
    not pin them. The price: backward runs once per forward (no `retain_graph`)."""

    @staticmethod
    def forward(ctx, loss: Tensor, hidden: Tensor, weight: Tensor, grad_hidden, grad_weight):  # type: ignore[override]
        ctx.grads = (grad_hidden, grad_weight)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError(
                "fused distillation loss: backward ran twice on one forward; its gradients are "
                "precomputed and released by the first backward (retain_graph is not supported)"
            )
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_out)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_out)
        return None, grad_hidden, grad_weight, None, None


def _run(
    student_hidden: Tensor,
    student_weight: Tensor,
    make_teacher,
    labels: Tensor,
    s: DistillSettings,
    num_items,
    chunk_size: int | None,
    name: str,
    weights: Tensor | None = None,
) -> Tensor:
    hidden_size = student_hidden.shape[-1]
    if student_weight.dim() != 2 or student_weight.shape[1] != hidden_size:
        raise LossConfigError(
            f"{name}: student_weight must be (V, {hidden_size}) to match the student hidden "
            f"size, got {tuple(student_weight.shape)}"
        )
    vocab = student_weight.shape[0]
    check_labels(labels, student_hidden.shape[:-1], vocab, name)
    check_weights(weights, labels, name)
    if chunk_size is not None and chunk_size < 1:
        raise LossConfigError(f"{name}: chunk_size must be >= 1, got {chunk_size}")
    rows = chunk_size or default_chunk_size(vocab)

    flat_labels = labels.reshape(-1)
    idx = (flat_labels != s.ignore_index).nonzero().squeeze(1)
    hidden_all = student_hidden.reshape(-1, hidden_size)
    need_h = torch.is_grad_enabled() and student_hidden.requires_grad
    need_w = torch.is_grad_enabled() and student_weight.requires_grad
    with torch.no_grad():
        hidden = hidden_all.detach().index_select(0, idx)
        row_weights = None
        if weights is not None:
            row_weights = weights.reshape(-1).index_select(0, idx).to(compute_dtype(hidden.dtype))
        total, grad_valid, grad_weight = _fused_forward(
            hidden,
            student_weight.detach(),
            make_teacher(idx),
            flat_labels.index_select(0, idx).long(),
            s,
            rows,
            need_h,
            need_w,
            row_weights,
        )
        denom = denominator(idx.numel(), num_items, total)
        loss = total / denom
        grad_hidden = None
        if grad_valid is not None:
            grad_hidden = torch.zeros(
                hidden_all.shape, dtype=student_hidden.dtype, device=student_hidden.device
            )
            grad_hidden.index_copy_(0, idx, grad_valid.div_(denom).to(student_hidden.dtype))
            grad_hidden = grad_hidden.view(student_hidden.shape)
        if grad_weight is not None:
            grad_weight = grad_weight.div_(denom).to(student_weight.dtype)
    if not (need_h or need_w):
        return loss
    return _FusedLinearDistill.apply(loss, student_hidden, student_weight, grad_hidden, grad_weight)


def fused_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    labels: Tensor,
    *,
    divergence: str = "forward_kl",
    temperature: float = 2.0,
    alpha: float = 0.5,
    beta: float = 0.5,
    skew: float = 0.1,
    ignore_index: int = -100,
    num_items: int | float | Tensor | None = None,
    chunk_size: int | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """`distillation_loss(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T,
    labels, ...)` without materializing either logits tensor.

    Args:
        student_hidden: (..., H_s) the student's last hidden states (after the final norm).
        student_weight: (V, H_s) the student's LM head (no bias).
        teacher_hidden: (..., H_t) the teacher's last hidden states on the same positions.
        teacher_weight: (V, H_t) the teacher's LM head. Teacher tensors never receive gradients.
        labels: (...) targets aligned with the rows (see `shift_labels`).
        chunk_size: rows per chunk; default `default_chunk_size(V)`.
        weights: (...) per-row loss weights like `labels`, or None (see `distillation_loss`:
            each row's loss and its gradient are scaled; the denominator is unchanged).
        Other keyword arguments: as in `distillation_loss`.

    Gradients flow to `student_hidden` and `student_weight` (whichever requires grad). The backward
    may run once per forward.
    """
    s = DistillSettings(divergence, temperature, alpha, beta, skew, ignore_index)
    name = "fused_distillation_loss"
    if teacher_weight.dim() != 2 or teacher_weight.shape[1] != teacher_hidden.shape[-1]:
        raise LossConfigError(
            f"{name}: teacher_weight must be (V, {teacher_hidden.shape[-1]}) to match the teacher "
            f"hidden size, got {tuple(teacher_weight.shape)}"
        )
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise LossConfigError(
            f"{name}: student vocabulary ({student_weight.shape[0]}) and teacher vocabulary "
            f"({teacher_weight.shape[0]}) differ; logit distillation needs a shared vocabulary"
        )
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise LossConfigError(
            f"{name}: teacher hidden states {tuple(teacher_hidden.shape)} and student hidden "
            f"states {tuple(student_hidden.shape)} must cover the same positions"
        )
    t_hidden = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    t_weight = teacher_weight.detach()
    return _run(
        student_hidden,
        student_weight,
        lambda idx: _DenseTeacher(t_hidden.index_select(0, idx), t_weight),
        labels,
        s,
        num_items,
        chunk_size,
        name,
        weights,
    )


def fused_sparse_distillation_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
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
    chunk_size: int | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """`sparse_distillation_loss(student_hidden @ student_weight.T, teacher_ids, teacher_logprobs,
    labels, ...)` chunked like `fused_distillation_loss`: the loss for an offline top-k cache."""
    s = DistillSettings(divergence, temperature, alpha, beta, skew, ignore_index)
    name = "fused_sparse_distillation_loss"
    if alpha > 0:
        check_sparse_divergence(divergence, skew, name)
    vocab = student_weight.shape[0]
    check_sparse_inputs(teacher_ids, teacher_logprobs, student_hidden.shape[:-1], vocab, name)
    k = teacher_ids.shape[-1]
    ids = teacher_ids.reshape(-1, k)
    logprobs = teacher_logprobs.detach().reshape(-1, k)
    return _run(
        student_hidden,
        student_weight,
        lambda idx: _SparseTeacher(ids.index_select(0, idx), logprobs.index_select(0, idx), vocab),
        labels,
        s,
        num_items,
        chunk_size,
        name,
        weights,
    )


__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "default_chunk_size",
    "fused_distillation_loss",
    "fused_sparse_distillation_loss",
    "rows_loss_and_grad",
]
