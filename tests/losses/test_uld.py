"""ULD against an independent float64 NumPy formula, and its properties: zero under a vocabulary
permutation, symmetry, padding invariance, the reduction rule, top-k, chunking, gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmdistill.losses import LossConfigError
from lmdistill.losses.uld import chunked_uld_loss, sorted_probs, uld_loss


def reference(student: np.ndarray, teacher: np.ndarray, temperature: float = 1.0) -> float:
    """Mean over rows of sum_i |p_(i) - q_(i)|, sorted descending, zero-padded (float64)."""

    def probs(x: np.ndarray) -> np.ndarray:
        z = x.astype(np.float64) / temperature
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        return -np.sort(-(e / e.sum(axis=-1, keepdims=True)), axis=-1)

    p, q = probs(student), probs(teacher)
    width = max(p.shape[1], q.shape[1])
    p = np.pad(p, ((0, 0), (0, width - p.shape[1])))
    q = np.pad(q, ((0, 0), (0, width - q.shape[1])))
    return float(np.abs(p - q).sum(axis=1).mean())


def logits(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize(("vs", "vt"), [(7, 7), (5, 11), (13, 4)])
def test_matches_float64_reference(vs: int, vt: int, temperature: float) -> None:
    s, t = logits(6, vs, 0), logits(6, vt, 1)
    got = uld_loss(s, t, temperature=temperature)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(reference(s.numpy(), t.numpy(), temperature), abs=1e-6)


def test_zero_for_identical_distribution_under_vocab_permutation() -> None:
    t = logits(4, 9, 0)
    s = t[:, torch.randperm(9, generator=torch.Generator().manual_seed(3))]
    assert uld_loss(s, t).item() == pytest.approx(0.0, abs=1e-6)
    assert uld_loss(s + 1.0, t).item() == pytest.approx(0.0, abs=1e-6)  # softmax ignores shifts
    assert uld_loss(s * 2, t).item() > 1e-3  # a sharper student is not the same shape


def test_symmetric() -> None:
    a, b = logits(5, 8, 0), logits(5, 12, 1)
    assert uld_loss(a, b).item() == pytest.approx(uld_loss(b, a).item(), abs=1e-7)


def test_padding_the_vocabulary_with_zero_probability_tokens_changes_nothing() -> None:
    s, t = logits(5, 8, 0), logits(5, 6, 1)
    padded = torch.cat([s, torch.full((5, 20), float("-inf"))], dim=1)
    assert uld_loss(padded, t).item() == pytest.approx(uld_loss(s, t).item(), abs=1e-7)


def test_reduction_rule_sum_over_rows_divided_by_num_items() -> None:
    s, t = logits(10, 8, 0), logits(10, 6, 1)
    whole = uld_loss(s, t)
    split = uld_loss(s[:3], t[:3], num_items=10) + uld_loss(s[3:], t[3:], num_items=10)
    assert split.item() == pytest.approx(whole.item(), rel=1e-6)
    assert uld_loss(s, t, num_items=20).item() == pytest.approx(whole.item() / 2, rel=1e-6)


def test_top_k_is_exact_at_full_vocab_and_a_lower_bound_below() -> None:
    s, t = logits(6, 30, 0, scale=1.0), logits(6, 50, 1, scale=1.0)
    exact = uld_loss(s, t).item()
    assert uld_loss(s, t, top_k=50).item() == pytest.approx(exact, abs=1e-6)
    # Only the teacher truncated (k >= Vs): still exact, its tail is compared against zeros.
    assert uld_loss(s, t, top_k=30).item() == pytest.approx(exact, abs=1e-6)
    for k in (1, 5, 20):
        assert uld_loss(s, t, top_k=k).item() <= exact + 1e-6
    # Peaked distributions: a small k is already close.
    sharp_s, sharp_t = logits(6, 300, 2, scale=8.0), logits(6, 500, 3, scale=8.0)
    sharp = uld_loss(sharp_s, sharp_t).item()
    assert uld_loss(sharp_s, sharp_t, top_k=32).item() == pytest.approx(sharp, rel=1e-2)


def test_sorted_probs_keeps_the_head_in_decreasing_order() -> None:
    x = logits(3, 40, 0)
    full = sorted_probs(x)
    assert torch.all(full[:, :-1] >= full[:, 1:])
    assert torch.allclose(sorted_probs(x, top_k=7), full[:, :7])


@pytest.mark.parametrize("top_k", [None, 4])
def test_gradient_matches_finite_differences(top_k: int | None) -> None:
    s = logits(3, 6, 0).double().requires_grad_()
    t = logits(3, 9, 1).double()
    assert torch.autograd.gradcheck(
        lambda x: uld_loss(x, t, top_k=top_k, temperature=1.5), (s,), eps=1e-6, atol=1e-5
    )


def test_teacher_gets_no_gradient() -> None:
    s = logits(3, 6, 0).requires_grad_()
    t = logits(3, 9, 1).requires_grad_()
    uld_loss(s, t).backward()
    assert t.grad is None and s.grad is not None


@pytest.mark.parametrize("top_k", [None, 5])
def test_chunked_equals_materialized_value_and_gradients(top_k: int | None) -> None:
    g = torch.Generator().manual_seed(0)
    hs, ws = torch.randn(11, 8, generator=g), torch.randn(20, 8, generator=g)
    ht, wt = torch.randn(11, 6, generator=g), torch.randn(33, 6, generator=g)
    a = [x.clone().requires_grad_() for x in (hs, ws)]
    b = [x.clone().requires_grad_() for x in (hs, ws)]
    ref = uld_loss(a[0] @ a[1].T, ht @ wt.T, top_k=top_k, num_items=7)
    got = chunked_uld_loss(b[0], b[1], ht, wt, top_k=top_k, num_items=7, chunk_size=4)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    ref.backward()
    got.backward()
    for x, y in zip(a, b, strict=True):
        assert torch.allclose(x.grad, y.grad, atol=1e-6)


def test_chunked_with_no_aligned_rows_is_zero_with_zero_gradients() -> None:
    hs, ws = torch.zeros(0, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    got = chunked_uld_loss(hs, ws, torch.zeros(0, 6), torch.randn(33, 6), num_items=5)
    got.backward()
    assert got.item() == 0.0 and torch.all(ws.grad == 0)


def test_bfloat16_inputs_are_computed_in_float32() -> None:
    s, t = logits(4, 10, 0), logits(4, 12, 1)
    got = uld_loss(s.bfloat16(), t.bfloat16())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(
        reference(s.bfloat16().float().numpy(), t.bfloat16().float().numpy()), abs=1e-5
    )


def test_misaligned_rows_and_bad_settings_are_clear_errors() -> None:
    with pytest.raises(LossConfigError, match="aligned"):
        uld_loss(logits(3, 5, 0), logits(4, 5, 1))
    with pytest.raises(LossConfigError, match="temperature"):
        uld_loss(logits(3, 5, 0), logits(3, 5, 1), temperature=0)
    with pytest.raises(LossConfigError, match="top_k"):
        uld_loss(logits(3, 5, 0), logits(3, 5, 1), top_k=0)
