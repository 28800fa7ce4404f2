"""The fused chunked loss equals the materialized one, in value and gradients, and holds one chunk."""

from __future__ import annotations

import pytest
import torch

from lmdistill.losses import (
    DIVERGENCES,
    LossConfigError,
    default_chunk_size,
    distillation_loss,
    fused_distillation_loss,
    fused_sparse_distillation_loss,
    sparse_distillation_loss,
)
from lmdistill.losses import fused as fused_module

IGNORE = -100


def inputs(n=29, hs=12, ht=20, v=37, seed=0, dtype=torch.float32, pad_every=5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hs, generator=g, dtype=dtype).requires_grad_(True)
    weight = (torch.randn(v, hs, generator=g, dtype=dtype) * 0.5).requires_grad_(True)
    t_hidden = torch.randn(n, ht, generator=g, dtype=dtype)
    t_weight = torch.randn(v, ht, generator=g, dtype=dtype) * 0.5
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::pad_every] = IGNORE
    return hidden, weight, t_hidden, t_weight, labels


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize(("T", "alpha"), [(1.0, 0.5), (2.0, 1.0), (0.5, 0.0), (3.0, 0.25)])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 29, 64])
def test_fused_equals_reference_values_and_gradients(divergence, T, alpha, chunk_size):
    hidden, weight, t_hidden, t_weight, labels = inputs(seed=chunk_size)
    kw = dict(divergence=divergence, temperature=T, alpha=alpha, beta=0.35, skew=0.15)
    want = distillation_loss(hidden @ weight.T, t_hidden @ t_weight.T, labels, **kw)
    want_h, want_w = torch.autograd.grad(want, [hidden, weight])
    got = fused_distillation_loss(
        hidden, weight, t_hidden, t_weight, labels, chunk_size=chunk_size, **kw
    )
    got_h, got_w = torch.autograd.grad(got, [hidden, weight])
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    assert rel(got_h, want_h) < 1e-4
    assert rel(got_w, want_w) < 1e-4


def test_fused_batched_input_shapes_and_num_items():
    hidden, weight, t_hidden, t_weight, labels = inputs(n=24)
    b_hidden = hidden.detach().view(3, 8, -1).requires_grad_(True)
    got = fused_distillation_loss(
        b_hidden, weight, t_hidden.view(3, 8, -1), t_weight, labels.view(3, 8), num_items=50
    )
    want = distillation_loss(
        b_hidden @ weight.T, (t_hidden @ t_weight.T).view(3, 8, -1), labels.view(3, 8), num_items=50
    )
    torch.testing.assert_close(got, want)
    got.backward()
    assert b_hidden.grad.shape == b_hidden.shape
    assert torch.count_nonzero(b_hidden.grad.view(24, -1)[labels == IGNORE]) == 0


def test_fused_gradient_scales_with_upstream_gradient_and_teacher_gets_none():
    hidden, weight, t_hidden, t_weight, labels = inputs()
    t_hidden.requires_grad_(True)
    t_weight.requires_grad_(True)
    loss = fused_distillation_loss(hidden, weight, t_hidden, t_weight, labels)
    (3.0 * loss).backward()
    ref = distillation_loss(hidden @ weight.T, t_hidden @ t_weight.T, labels)
    want_h, want_w = torch.autograd.grad(3.0 * ref, [hidden, weight])
    assert rel(hidden.grad, want_h) < 1e-4
    assert rel(weight.grad, want_w) < 1e-4
    assert t_hidden.grad is None and t_weight.grad is None


def test_frozen_head_gets_no_gradient_work():
    hidden, weight, t_hidden, t_weight, labels = inputs()
    weight.requires_grad_(False)
    loss = fused_distillation_loss(hidden, weight, t_hidden, t_weight, labels)
    loss.backward()
    assert hidden.grad is not None and weight.grad is None


def test_no_grad_mode_returns_plain_value():
    hidden, weight, t_hidden, t_weight, labels = inputs()
    with torch.no_grad():
        value = fused_distillation_loss(hidden, weight, t_hidden, t_weight, labels)
    assert not value.requires_grad
    want = distillation_loss(hidden @ weight.T, t_hidden @ t_weight.T, labels)
    torch.testing.assert_close(value, want.detach())


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fused_gradients_match_finite_differences_in_double(divergence):
    """gradcheck's method by hand (gradcheck itself calls backward twice per forward, which the
    fused loss refuses): central differences along random directions, float64."""
    hidden, weight, t_hidden, t_weight, labels = inputs(n=6, hs=3, ht=4, v=5, dtype=torch.float64)

    def f(h, w):
        return fused_distillation_loss(
            h,
            w,
            t_hidden,
            t_weight,
            labels,
            divergence=divergence,
            temperature=1.3,
            alpha=0.7,
            chunk_size=4,
        )

    grad_h, grad_w = torch.autograd.grad(f(hidden, weight), [hidden, weight])
    g = torch.Generator().manual_seed(1)
    eps = 1e-6
    with torch.no_grad():
        for _ in range(5):
            dh = torch.randn(hidden.shape, generator=g, dtype=torch.float64)
            dw = torch.randn(weight.shape, generator=g, dtype=torch.float64)
            numeric = (
                f(hidden + eps * dh, weight + eps * dw) - f(hidden - eps * dh, weight - eps * dw)
            ) / (2 * eps)
            analytic = (grad_h * dh).sum() + (grad_w * dw).sum()
            assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic))


def test_second_backward_is_a_clear_error():
    hidden, weight, t_hidden, t_weight, labels = inputs()
    loss = fused_distillation_loss(hidden, weight, t_hidden, t_weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


@pytest.mark.parametrize("divergence", [d for d in DIVERGENCES if d != "reverse_kl"])
def test_fused_sparse_equals_sparse_and_k_equal_v_equals_dense(divergence):
    hidden, weight, t_hidden, t_weight, labels = inputs(seed=3)
    t_logits = t_hidden @ t_weight.T
    for k in (5, t_weight.shape[0]):
        logprobs, ids = torch.log_softmax(t_logits, -1).topk(k, dim=-1)
        want = sparse_distillation_loss(
            hidden @ weight.T, ids, logprobs, labels, divergence=divergence, temperature=2.0
        )
        want_h, want_w = torch.autograd.grad(want, [hidden, weight])
        got = fused_sparse_distillation_loss(
            hidden,
            weight,
            ids,
            logprobs,
            labels,
            divergence=divergence,
            temperature=2.0,
            chunk_size=6,
        )
        got_h, got_w = torch.autograd.grad(got, [hidden, weight])
        assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
        assert rel(got_h, want_h) < 1e-4 and rel(got_w, want_w) < 1e-4
    dense = fused_distillation_loss(
        hidden, weight, t_hidden, t_weight, labels, divergence=divergence, temperature=2.0
    )
    torch.testing.assert_close(got, dense)


def test_bf16_fused_within_1e3_of_float64():
    hidden, weight, t_hidden, t_weight, labels = inputs(n=40, v=300, seed=5)
    args = [x.detach().bfloat16() for x in (hidden, weight, t_hidden, t_weight)]
    got = fused_distillation_loss(*args, labels)
    assert got.dtype == torch.float32
    want = distillation_loss(
        args[0].double() @ args[1].double().T, args[2].double() @ args[3].double().T, labels
    )
    assert abs(got.double() - want) / want < 1e-3


def test_never_holds_more_than_one_chunk_of_logits(monkeypatch):
    """Spy on the per-chunk kernel: every (rows, V) tensor it sees has at most chunk_size rows and
    lives in one of the four workspace buffers allocated once per call, so no chunk's logits
    outlive it and nothing of size (N, V) is ever allocated."""
    hidden, weight, t_hidden, t_weight, labels = inputs(n=50, v=41)
    rows_seen: list[int] = []
    storages: set[int] = set()
    real = fused_module.rows_loss_and_grad

    def spy(z, log_p, lbl, s, scratch, *, need_grad, weights=None):
        rows_seen.append(z.shape[0])
        for t in (z, log_p, *scratch):
            assert t.shape == z.shape
            storages.add(t.untyped_storage().data_ptr())
        return real(z, log_p, lbl, s, scratch, need_grad=need_grad, weights=weights)

    monkeypatch.setattr(fused_module, "rows_loss_and_grad", spy)
    loss = fused_distillation_loss(hidden, weight, t_hidden, t_weight, labels, chunk_size=8)
    loss.backward()
    assert max(rows_seen) <= 8 and len(rows_seen) == 5
    assert len(storages) == 4
    assert sum(rows_seen) == int((labels != IGNORE).sum())  # padding rows cost no compute


def test_default_chunk_size_bounds_chunk_memory():
    assert default_chunk_size(32000) * 32000 <= fused_module.DEFAULT_CHUNK_ELEMENTS
    assert default_chunk_size(32000) >= 512  # efficient matmuls at common vocabularies
    assert default_chunk_size(262144) == fused_module.MIN_CHUNK_ROWS


def test_fused_errors():
    hidden, weight, t_hidden, t_weight, labels = inputs()
    with pytest.raises(LossConfigError, match="vocabulary"):
        fused_distillation_loss(hidden, weight, t_hidden, t_weight[:-1], labels)
    with pytest.raises(LossConfigError, match="student_weight"):
        fused_distillation_loss(hidden, weight[:, :-1], t_hidden, t_weight, labels)
    with pytest.raises(LossConfigError, match="same positions"):
        fused_distillation_loss(hidden, weight, t_hidden[:-1], t_weight, labels)
    with pytest.raises(LossConfigError, match="chunk_size"):
        fused_distillation_loss(hidden, weight, t_hidden, t_weight, labels, chunk_size=0)
    ids = torch.zeros(hidden.shape[0], 3, dtype=torch.long)
    with pytest.raises(LossConfigError, match="reverse_kl"):
        fused_sparse_distillation_loss(
            hidden, weight, ids, torch.zeros(ids.shape), labels, divergence="reverse_kl"
        )
    with pytest.raises(LossConfigError, match="teacher ids"):
        fused_sparse_distillation_loss(hidden, weight, ids + 1000, torch.zeros(ids.shape), labels)


# ------------------------------------------------------------------------------ per-row weights
def sparse_top(t_hidden, t_weight, k):
    logprobs, ids = torch.log_softmax(t_hidden @ t_weight.T, -1).topk(k, dim=-1)
    return ids, logprobs


def grads_of(loss, tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("kind", ["reference", "fused", "sparse", "fused_sparse"])
def test_all_one_weights_equal_no_weights_bitwise(kind):
    hidden, weight, t_hidden, t_weight, labels = inputs()
    ids, logprobs = sparse_top(t_hidden, t_weight, 5)
    kw = dict(divergence="jsd", temperature=2.0, alpha=0.5)

    def loss(weights):
        if kind == "reference":
            return distillation_loss(
                hidden @ weight.T, t_hidden @ t_weight.T, labels, weights=weights, **kw
            )
        if kind == "sparse":
            return sparse_distillation_loss(
                hidden @ weight.T, ids, logprobs, labels, weights=weights, **kw
            )
        if kind == "fused":
            return fused_distillation_loss(
                hidden, weight, t_hidden, t_weight, labels, weights=weights, chunk_size=7, **kw
            )
        return fused_sparse_distillation_loss(
            hidden, weight, ids, logprobs, labels, weights=weights, chunk_size=7, **kw
        )

    plain, ones = loss(None), loss(torch.ones(labels.shape))
    assert torch.equal(plain, ones)
    for a, b in zip(
        grads_of(plain, [hidden, weight]), grads_of(ones, [hidden, weight]), strict=True
    ):
        assert torch.equal(a, b)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_weighted_fused_equals_weighted_reference(divergence, alpha):
    hidden, weight, t_hidden, t_weight, labels = inputs(seed=3)
    weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(4)) * 2
    kw = dict(divergence=divergence, temperature=1.5, alpha=alpha, weights=weights, num_items=40)
    want = distillation_loss(hidden @ weight.T, t_hidden @ t_weight.T, labels, **kw)
    got = fused_distillation_loss(hidden, weight, t_hidden, t_weight, labels, chunk_size=6, **kw)
    assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
    for g, w in zip(grads_of(got, [hidden, weight]), grads_of(want, [hidden, weight]), strict=True):
        assert rel(g, w) < 1e-4
    if divergence != "reverse_kl":
        ids, logprobs = sparse_top(t_hidden, t_weight, 6)
        want = sparse_distillation_loss(hidden @ weight.T, ids, logprobs, labels, **kw)
        got = fused_sparse_distillation_loss(
            hidden, weight, ids, logprobs, labels, chunk_size=6, **kw
        )
        assert abs(got.item() - want.item()) <= 1e-5 * abs(want.item())
        for g, w in zip(
            grads_of(got, [hidden, weight]), grads_of(want, [hidden, weight]), strict=True
        ):
            assert rel(g, w) < 1e-4


def test_weights_scale_each_rows_loss_and_keep_the_denominator():
    """Doubling every weight doubles the loss (the denominator is still the token count); a row of
    weight zero gets no gradient; the weighted loss is the weighted sum of per-row losses / count."""
    hidden, weight, t_hidden, t_weight, labels = inputs(n=10, pad_every=4)
    t_logits = t_hidden @ t_weight.T
    plain = distillation_loss(hidden @ weight.T, t_logits, labels)
    doubled = fused_distillation_loss(
        hidden, weight, t_hidden, t_weight, labels, weights=torch.full(labels.shape, 2.0)
    )
    torch.testing.assert_close(doubled, 2 * plain)
    weights = torch.linspace(0, 1.8, 10)
    per_row = torch.stack(
        [
            distillation_loss(hidden[i : i + 1] @ weight.T, t_logits[i : i + 1], labels[i : i + 1])
            for i in range(10)
        ]
    )
    valid = labels != IGNORE
    want = (per_row * weights)[valid].sum() / valid.sum()
    got = fused_distillation_loss(hidden, weight, t_hidden, t_weight, labels, weights=weights)
    torch.testing.assert_close(got, want)
    (grad_h,) = torch.autograd.grad(got, [hidden])
    assert torch.count_nonzero(grad_h[0]) == 0  # weight 0 on row 0


def test_bad_weights_are_clear_errors():
    hidden, weight, t_hidden, t_weight, labels = inputs()
    with pytest.raises(LossConfigError, match="weights have shape"):
        fused_distillation_loss(hidden, weight, t_hidden, t_weight, labels, weights=torch.ones(3))
    with pytest.raises(LossConfigError, match="weights must be floating point"):
        distillation_loss(
            hidden @ weight.T,
            t_hidden @ t_weight.T,
            labels,
            weights=torch.ones(labels.shape, dtype=torch.long),
        )
