"""Held-out metrics: cross-entropy on assistant tokens, and closeness to the teacher.

    ce     cross-entropy of the student on the held-out targets (nats per token)
    kl     KL(teacher || student) at T = 1 per target position (against the renormalised top-k
           teacher when the teacher is a cache)
    top1   fraction of target positions where the student's most likely token is the teacher's

All are sums over positions divided by the global count, like the training losses, so they do not
depend on how the held-out set is batched or split across processes."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from lmdistill.data.sft import IGNORE_INDEX, Batch
from lmdistill.losses import fused_distillation_loss, fused_sparse_distillation_loss
from lmdistill.teachers.forward import Signals, forward_signals
from lmdistill.training.signals import cross_entropy

Reduce = Callable[[Tensor], Tensor]  # sums a tensor over processes (identity on one process)


def argmax_tokens(hidden: Tensor, head: Tensor, chunk: int = 1024) -> Tensor:
    """argmax over the vocabulary of hidden @ head.T, chunked: (N, H), (V, H) -> (N,)."""
    if hidden.shape[0] == 0:  # a batch without targets (a process's filler held-out batch)
        return torch.empty(0, dtype=torch.long, device=hidden.device)
    return torch.cat(
        [(hidden[i : i + chunk] @ head.T).argmax(-1) for i in range(0, hidden.shape[0], chunk)]
    )


@torch.no_grad()
def batch_sums(s: Signals, batch: Batch, teacher: Signals | None) -> Tensor:
    """(positions, ce sum, kl sum, top-1 hits) of the student's signals `s` on one batch; kl and
    top1 are NaN without a teacher. `teacher` is an online teacher's signals; a cached teacher
    rides in the batch."""
    count = batch.targets.ne(IGNORE_INDEX).sum()
    ce = cross_entropy(s.hidden, s.head, batch.targets, num_items=1.0)
    keep = batch.targets.reshape(-1) != IGNORE_INDEX
    if teacher is not None:
        kl = fused_distillation_loss(
            s.hidden,
            s.head,
            teacher.hidden,
            teacher.head,
            batch.targets,
            temperature=1.0,
            alpha=1.0,
            num_items=1.0,
        )
        teacher_top = argmax_tokens(
            teacher.hidden.reshape(-1, teacher.hidden.shape[-1])[keep], teacher.head
        )
    elif batch.teacher_ids is not None:
        kl = fused_sparse_distillation_loss(
            s.hidden,
            s.head,
            batch.teacher_ids,
            batch.teacher_logprobs,
            batch.targets,
            temperature=1.0,
            alpha=1.0,
            num_items=1.0,
        )
        teacher_top = batch.teacher_ids.reshape(-1, batch.teacher_ids.shape[-1])[keep, 0]
    else:
        nan = torch.tensor(float("nan"), device=ce.device)
        return torch.stack([count.to(ce), ce, nan, nan])
    student_top = argmax_tokens(s.hidden.reshape(-1, s.hidden.shape[-1])[keep], s.head)
    hits = (student_top == teacher_top).sum()
    return torch.stack([count.to(ce), ce, kl.to(ce), hits.to(ce)])


def evaluate(
    student: Callable[[Batch, Signals | None], Tensor] | torch.nn.Module,
    batches: Iterable[Batch],
    teacher: Callable[[Batch], Signals] | None = None,
    reduce: Reduce = lambda t: t,
) -> dict[str, float]:
    """Held-out `ce`, `kl`, `top1` (see the module docstring) and `tokens`, over `batches`
    (already on the student's device). `student`: an HF causal LM, or a module called as
    `student(batch, teacher_signals)` that returns `batch_sums` (the loop's wrapped
    DistillModule). `teacher`: an online teacher (batch -> Signals)."""
    score = student
    if hasattr(student, "get_decoder") or hasattr(student, "get_base_model"):

        def score(batch: Batch, t: Signals | None) -> Tensor:
            return batch_sums(forward_signals(student, batch), batch, t)

    was_training = student.training
    student.eval()
    try:
        total = None
        with torch.no_grad():
            for batch in batches:
                sums = score(batch, teacher(batch) if teacher is not None else None)
                total = sums if total is None else total + sums
    finally:
        student.train(was_training)
    if total is None:
        total = torch.zeros(4)
    count, ce, kl, hits = reduce(total.double()).tolist()
    count = max(count, 1.0)
    out = {"tokens": int(count), "ce": ce / count}
    if kl == kl:  # not NaN: a teacher was there
        out.update(kl=kl / count, top1=hits / count)
    return out
