"""distillation_loss and sparse_distillation_loss against independent float64 formulas and properties."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmdistill.losses import (
    DIVERGENCES,
    LossConfigError,
    distillation_loss,
    shift_labels,
    sparse_distillation_loss,
)

IGNORE = -100


def kl64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) per row, float64, written with xlogy (independent of the library's formula)."""
    return (torch.special.xlogy(a, a) - torch.special.xlogy(a, b)).sum(-1)


def reference64(student, teacher, labels, divergence, T, alpha, beta=0.5, skew=0.1):
    """The whole loss in float64 from its definition in the issue."""
    s, t = student.double(), teacher.double()
    p, q = F.softmax(t / T, -1), F.softmax(s / T, -1)
    if divergence == "forward_kl":
        soft = kl64(p, q)
    elif divergence == "reverse_kl":
        soft = kl64(q, p)
    elif divergence == "jsd":
        m = beta * p + (1 - beta) * q
        soft = beta * kl64(p, m) + (1 - beta) * kl64(q, m)
    elif divergence == "skew_forward_kl":
        soft = kl64(p, skew * p + (1 - skew) * q)
    elif divergence == "skew_reverse_kl":
        soft = kl64(q, skew * q + (1 - skew) * p)
    else:
        soft = 0.5 * (p - q).abs().sum(-1)
    hard = -F.log_softmax(s, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    per = alpha * T * T * soft + (1 - alpha) * hard
    mask = labels != IGNORE
    return (per * mask).sum() / mask.sum()


def batch(b=3, t=7, v=11, seed=0, pad_every=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(b, t, v, generator=g) * 2).to(dtype)
    teacher = (torch.randn(b, t, v, generator=g) * 2).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels.view(-1)[::pad_every] = IGNORE
    return student, teacher, labels


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize(("T", "alpha"), [(1.0, 1.0), (2.0, 0.5), (0.7, 0.3), (4.0, 0.0)])
def test_matches_float64_formula(divergence, T, alpha):
    for seed, shape in enumerate([(2, 5, 13), (1, 9, 31), (4, 3, 7)]):
        student, teacher, labels = batch(*shape, seed=seed)
        got = distillation_loss(
            student, teacher, labels, divergence=divergence, temperature=T, alpha=alpha, beta=0.3
        )
        want = reference64(student, teacher, labels, divergence, T, alpha, beta=0.3)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_forward_kl_matches_torch_kl_div_with_masked_mean():
    student, teacher, labels = batch(seed=3)
    T = 2.0
    got = distillation_loss(student, teacher, labels, temperature=T, alpha=1.0)
    mask = labels != IGNORE
    kl = F.kl_div(
        F.log_softmax(student[mask] / T, -1), F.softmax(teacher[mask] / T, -1), reduction="sum"
    )
    torch.testing.assert_close(got, kl * T * T / mask.sum())


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_identical_distributions_give_zero_and_others_are_positive(divergence):
    student, teacher, labels = batch(seed=1)
    same = distillation_loss(student, student.clone(), labels, divergence=divergence, alpha=1.0)
    assert abs(same.item()) < 1e-6
    diff = distillation_loss(student, teacher, labels, divergence=divergence, alpha=1.0)
    assert diff.item() > 1e-3


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extra_padding_changes_neither_value_nor_gradients(divergence):
    student, teacher, labels = batch(seed=2)
    student.requires_grad_(True)
    base = distillation_loss(student, teacher, labels, divergence=divergence)
    (grad_base,) = torch.autograd.grad(base, student)

    # Append padded positions holding garbage, including inf and NaN.
    b, t, v = student.shape
    junk = torch.randn(b, 5, v) * 100
    junk[0, 0, 0] = float("nan")
    junk[1, 1, 1] = float("inf")
    padded_student = torch.cat([student.detach(), junk], 1).requires_grad_(True)
    padded_teacher = torch.cat([teacher, -junk], 1)
    padded_labels = torch.cat([labels, torch.full((b, 5), IGNORE)], 1)
    padded = distillation_loss(padded_student, padded_teacher, padded_labels, divergence=divergence)
    (grad_padded,) = torch.autograd.grad(padded, padded_student)
    torch.testing.assert_close(padded, base)
    torch.testing.assert_close(grad_padded[:, :t], grad_base)
    assert torch.count_nonzero(grad_padded[:, t:]) == 0
    # Masked positions inside the sequence also get exactly zero gradient.
    assert torch.count_nonzero(grad_base[labels == IGNORE]) == 0


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd", "tvd"])
def test_split_batches_with_num_items_sum_to_the_whole(divergence):
    student, teacher, labels = batch(b=4, seed=5)
    whole = distillation_loss(student, teacher, labels, divergence=divergence)
    n = int((labels != IGNORE).sum())
    parts = sum(
        distillation_loss(
            student[i : i + 1],
            teacher[i : i + 1],
            labels[i : i + 1],
            divergence=divergence,
            num_items=n,
        )
        for i in range(4)
    )
    torch.testing.assert_close(parts, whole)
    as_tensor = distillation_loss(student, teacher, labels, num_items=torch.tensor(float(n)))
    torch.testing.assert_close(as_tensor, distillation_loss(student, teacher, labels))


def test_all_positions_masked_gives_zero_not_nan():
    student, teacher, labels = batch()
    out = distillation_loss(student, teacher, torch.full_like(labels, IGNORE))
    assert out.item() == 0.0


def test_teacher_never_receives_gradient():
    student, teacher, labels = batch()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    distillation_loss(student, teacher, labels, divergence="jsd").backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.count_nonzero(student.grad) > 0


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck_double(divergence):
    student, teacher, labels = batch(b=2, t=3, v=5, seed=7, pad_every=3, dtype=torch.float64)
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s: distillation_loss(
            s,
            teacher,
            labels,
            divergence=divergence,
            temperature=1.5,
            alpha=0.6,
            beta=0.4,
            skew=0.2,
        ),
        (student,),
    )


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_bf16_inputs_within_1e3_of_float64(divergence):
    student, teacher, labels = batch(b=2, t=16, v=257, seed=11)
    student, teacher = student.bfloat16(), teacher.bfloat16()
    got = distillation_loss(student, teacher, labels, divergence=divergence)
    assert got.dtype == torch.float32  # computed in float32 whatever the input dtype
    want = reference64(student, teacher, labels, divergence, 2.0, 0.5)
    assert abs(got.double() - want) / want < 1e-3


@pytest.mark.parametrize("divergence", [d for d in DIVERGENCES if d != "reverse_kl"])
def test_sparse_with_k_equal_v_equals_dense(divergence):
    student, teacher, labels = batch(seed=4)
    v = student.shape[-1]
    logprobs, ids = torch.log_softmax(teacher, -1).topk(v, dim=-1)
    dense = distillation_loss(student, teacher, labels, divergence=divergence, temperature=1.7)
    sparse = sparse_distillation_loss(
        student, ids, logprobs, labels, divergence=divergence, temperature=1.7
    )
    torch.testing.assert_close(sparse, dense)


def test_sparse_topk_renormalises_over_its_tokens():
    student, teacher, labels = batch(seed=8, v=13)
    k, T = 4, 2.0
    logprobs, ids = torch.log_softmax(teacher, -1).topk(k, dim=-1)
    got = sparse_distillation_loss(student, ids, logprobs, labels, temperature=T, alpha=1.0)
    # Independent: the teacher's logits restricted to its top-k (others -inf), tempered, softmaxed.
    restricted = torch.full_like(teacher, float("-inf")).scatter(-1, ids, teacher.gather(-1, ids))
    mask = labels != IGNORE
    p = F.softmax(restricted[mask].double() / T, -1)
    q = F.softmax(student[mask].double() / T, -1)
    want = kl64(p, q).mean() * T * T
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_sparse_padding_entries_carry_no_mass():
    student, teacher, labels = batch(seed=9, v=13)
    logprobs, ids = torch.log_softmax(teacher, -1).topk(4, dim=-1)
    base = sparse_distillation_loss(student, ids, logprobs, labels)
    # Two more slots of padding: -inf log-prob, pointing at an id already in the top-k.
    pad_ids = torch.cat([ids, ids[..., :2]], -1)
    pad_lp = torch.cat([logprobs, torch.full_like(logprobs[..., :2], float("-inf"))], -1)
    torch.testing.assert_close(sparse_distillation_loss(student, pad_ids, pad_lp, labels), base)


def test_sparse_refuses_reverse_kl():
    student, teacher, labels = batch()
    logprobs, ids = torch.log_softmax(teacher, -1).topk(3, dim=-1)
    with pytest.raises(LossConfigError, match="reverse_kl"):
        sparse_distillation_loss(student, ids, logprobs, labels, divergence="reverse_kl")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"divergence": "kl"}, "unknown divergence"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"alpha": 1.5}, "alpha"),
        ({"divergence": "jsd", "beta": 0.0}, "beta"),
        ({"divergence": "jsd", "beta": 1.0}, "beta"),
        ({"divergence": "skew_forward_kl", "skew": 1.0}, "skew"),
        ({"divergence": "skew_reverse_kl", "skew": -0.1}, "skew"),
        ({"num_items": 0}, "num_items"),
    ],
)
def test_invalid_settings_are_clear_errors(kwargs, message):
    student, teacher, labels = batch()
    with pytest.raises(LossConfigError, match=message):
        distillation_loss(student, teacher, labels, **kwargs)


def test_shape_and_vocab_mismatch_errors():
    student, teacher, labels = batch(v=11)
    with pytest.raises(LossConfigError, match="vocabulary"):
        distillation_loss(student, teacher[..., :10], labels)
    with pytest.raises(LossConfigError, match="same shape"):
        distillation_loss(student, teacher[:, :3], labels)
    with pytest.raises(LossConfigError, match="labels have shape"):
        distillation_loss(student, teacher, labels[:, :3])
    with pytest.raises(LossConfigError, match="outside the vocabulary"):
        distillation_loss(student, teacher, torch.full_like(labels, 11))


def test_shift_labels_aligns_causal_targets():
    labels = torch.tensor([[5, 6, 7, IGNORE], [1, 2, 3, 4]])
    torch.testing.assert_close(
        shift_labels(labels), torch.tensor([[6, 7, IGNORE, IGNORE], [2, 3, 4, IGNORE]])
    )
    # Equivalent to the textbook shift of logits and labels.
    logits = torch.randn(2, 4, 9)
    teacher = torch.randn(2, 4, 9)
    labels = torch.randint(0, 9, (2, 4))
    shifted = distillation_loss(logits, teacher, shift_labels(labels))
    textbook = distillation_loss(logits[:, :-1], teacher[:, :-1], labels[:, 1:])
    torch.testing.assert_close(shifted, textbook)
