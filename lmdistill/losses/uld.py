"""Universal Logit Distillation (ULD): logit distillation between models whose tokenizers differ.

Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss
for LLMs", arXiv:2402.12030. With no shared vocabulary there is no token-to-token correspondence,
so ULD compares the *shapes* of the two distributions: the 1-D Wasserstein distance between them
under a uniform transport cost, which has the closed form

    ULD(p, q) = sum_i | p_(i) - q_(i) |

where p_(i), q_(i) are the probabilities sorted in decreasing order and the shorter vocabulary is
zero-padded to the longer one (paper, eq. 6-7). It is symmetric, zero exactly when the two sorted
vectors agree (for instance, identical distributions under any permutation of the vocabulary), and
ignores which token carries which probability: it teaches the student how confident to be, not what
to say; the cross-entropy on the student's own tokens (the paper's L_CE, mixed in by the objective)
does that.

Rows are assumed aligned by the caller (the paper aligns by index within the response; see
`lmdistill.data.cross_tokenizer`). Reduction: the one rule, sum over rows / `num_items` (default:
the number of rows). No T^2 factor: the term is a distance between probability vectors, not a KL,
and the paper uses T = 1.

Top-k truncation (memory): with a 262k-entry teacher vocabulary, sorting every row and keeping it
for the backward costs (rows, 262k) floats and int64 indices. With `top_k = k`, only the k largest
probabilities of each side are kept (exactly the head of the sorted vector), and the tails are
compared by their masses:

    ULD_k(p, q) = sum_{i < k} | p_(i) - q_(i) | + | P_tail - Q_tail |,   P_tail = 1 - sum_{i < k} p_(i)

By the triangle inequality this is a lower bound of the exact value; it equals it when at most one
side is truncated (vocabulary <= k) or when one distribution's tail lies entirely above the other's
(the usual case for two peaked LM distributions), and k >= both vocabularies gives the exact loss.
The tails still get a gradient through P_tail. Limit: when both distributions are flat beyond rank
k (high temperature, untrained models) the tail term undercounts the distance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lmdistill.losses.distill import compute_dtype, denominator
from lmdistill.losses.divergences import LossConfigError


def sorted_probs(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None) -> Tensor:
    """softmax(logits / T) sorted in decreasing order, the first min(top_k, V) entries.

    (N, V) -> (N, min(k, V)) in the compute dtype (float32, or float64 for float64 input).
    Differentiable (through the sort / top-k selection)."""
    probs = F.softmax(logits.to(compute_dtype(logits.dtype)) / temperature, dim=-1)
    vocab = probs.shape[-1]
    if top_k is None or top_k >= vocab:
        return probs.sort(dim=-1, descending=True).values
    return probs.topk(top_k, dim=-1, sorted=True).values


def uld_distance(
    student_sorted: Tensor,
    teacher_sorted: Tensor,
    *,
    student_truncated: bool = False,
    teacher_truncated: bool = False,
) -> Tensor:
    """Per-row ULD between two sorted probability vectors, (N, Ks), (N, Kt) -> (N,).

    The shorter is zero-padded to the longer. A side marked truncated (its vocabulary was cut to
    its top-k) adds its missing mass to the tail term | P_tail - Q_tail | (see the module
    docstring); an untruncated side has tail 0."""
    width = max(student_sorted.shape[-1], teacher_sorted.shape[-1])
    s = F.pad(student_sorted, (0, width - student_sorted.shape[-1]))
    t = F.pad(teacher_sorted, (0, width - teacher_sorted.shape[-1])).to(s.dtype)
    distance = (s - t).abs().sum(dim=-1)
    if student_truncated or teacher_truncated:
        zero = s.new_zeros(s.shape[0])
        # clamp: 1 - sum may come out a rounding error below 0
        s_tail = (1 - s.sum(dim=-1)).clamp(min=0) if student_truncated else zero
        t_tail = (1 - t.sum(dim=-1)).clamp(min=0) if teacher_truncated else zero
        distance = distance + (s_tail - t_tail).abs()
    return distance


def uld_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    num_items: int | float | Tensor | None = None,
) -> Tensor:
    """Universal Logit Distillation loss on aligned rows (paper: arXiv:2402.12030).

    Args:
        student_logits: (N, Vs) student logits, any float dtype (computed in float32 or wider).
        teacher_logits: (N, Vt) teacher logits on the aligned positions; Vt may differ from Vs.
            Never receives a gradient.
        temperature: T > 0; both sides are softmax(logits / T). No T^2 factor.
        top_k: keep the k largest probabilities of each side plus a tail-mass term (see the module
            docstring); None: the exact loss.
        num_items: divide the sum over rows by this (the global count across gradient-accumulation
            steps and processes); default: N.

    Returns: a scalar, sum over rows of sum_i |p_(i) - q_(i)|, divided by num_items.
    """
    _check(student_logits, teacher_logits, temperature, top_k)
    with torch.no_grad():
        teacher = sorted_probs(teacher_logits.detach(), temperature=temperature, top_k=top_k)
    student = sorted_probs(student_logits, temperature=temperature, top_k=top_k)
    total = uld_distance(
        student,
        teacher,
        student_truncated=_truncates(top_k, student_logits.shape[-1]),
        teacher_truncated=_truncates(top_k, teacher_logits.shape[-1]),
    ).sum()
    return total / denominator(student_logits.shape[0], num_items, total)


def chunked_uld_loss(
    student_hidden: Tensor,
    student_head: Tensor,
    teacher_hidden: Tensor,
    teacher_head: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    num_items: int | float | Tensor | None = None,
    chunk_size: int = 256,
) -> Tensor:
    """`uld_loss` of the logits hidden @ head.T, never holding more than one chunk of rows' logits.

    Args:
        student_hidden: (N, Hs) the student's final hidden states at the aligned positions.
        student_head: (Vs, Hs) the student's LM head weight.
        teacher_hidden: (N, Ht), teacher_head: (Vt, Ht) likewise for the teacher (no gradient).
        chunk_size: rows per chunk.

    The teacher's sorted (top-k) probabilities are computed chunk by chunk without gradient and
    kept, (N, min(k, Vt)). Each student chunk runs under activation checkpointing, so its
    (chunk, Vs) logits, softmax and sort are recomputed in the backward instead of stored: peak
    memory is one chunk's worth, at the price of a second student LM-head matmul per chunk."""
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise LossConfigError(
            f"chunked_uld_loss: {student_hidden.shape[0]} student rows but "
            f"{teacher_hidden.shape[0]} teacher rows; the rows must be aligned"
        )
    _check_settings(temperature, top_k)
    rows = student_hidden.shape[0]
    s_cut = _truncates(top_k, student_head.shape[0])
    t_cut = _truncates(top_k, teacher_head.shape[0])
    # Zero rows (no aligned position in this micro-batch) still give a value connected to the
    # inputs, so a backward (and DDP's gradient hooks) runs as on any other micro-batch.
    total = (student_hidden.sum() + student_head.sum()).to(compute_dtype(student_hidden.dtype)) * 0
    for lo in range(0, rows, chunk_size):
        with torch.no_grad():
            t_logits = teacher_hidden[lo : lo + chunk_size].detach() @ teacher_head.detach().T
            teacher = sorted_probs(t_logits, temperature=temperature, top_k=top_k)
            del t_logits

        def chunk_sum(hidden: Tensor, head: Tensor, teacher: Tensor = teacher) -> Tensor:
            student = sorted_probs(hidden @ head.T, temperature=temperature, top_k=top_k)
            return uld_distance(
                student, teacher, student_truncated=s_cut, teacher_truncated=t_cut
            ).sum()

        part = student_hidden[lo : lo + chunk_size]
        if torch.is_grad_enabled() and (student_hidden.requires_grad or student_head.requires_grad):
            total = total + checkpoint(chunk_sum, part, student_head, use_reentrant=False)
        else:
            total = total + chunk_sum(part, student_head)
    return total / denominator(rows, num_items, total)


def _truncates(top_k: int | None, vocab: int) -> bool:
    return top_k is not None and top_k < vocab


def _check_settings(temperature: float, top_k: int | None) -> None:
    if not temperature > 0:
        raise LossConfigError(f"uld: temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise LossConfigError(f"uld: top_k must be >= 1 or None, got {top_k}")


def _check(student: Tensor, teacher: Tensor, temperature: float, top_k: int | None) -> None:
    _check_settings(temperature, top_k)
    if student.dim() != 2 or teacher.dim() != 2:
        raise LossConfigError(
            f"uld_loss: logits must be (N, V) rows, got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    if student.shape[0] != teacher.shape[0]:
        raise LossConfigError(
            f"uld_loss: {student.shape[0]} student rows but {teacher.shape[0]} teacher rows; "
            "the rows must be aligned positions"
        )
    if not student.is_floating_point() or not teacher.is_floating_point():
        raise LossConfigError("uld_loss: logits must be floating point")
