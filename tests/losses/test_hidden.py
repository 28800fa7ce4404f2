import pytest
import torch
import torch.nn.functional as F

from lmdistill.losses import HiddenProjection, LossConfigError, hidden_state_loss


def test_mse_and_cosine_match_hand_formulas_with_mask():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 8, generator=g)
    teacher = torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 1, 1]], dtype=torch.bool)
    mse = hidden_state_loss(student, teacher, mask, kind="mse")
    torch.testing.assert_close(mse, F.mse_loss(student[mask], teacher[mask]))
    cos = hidden_state_loss(student, teacher, mask, kind="cosine")
    want = (1 - F.cosine_similarity(student[mask], teacher[mask], dim=-1)).mean()
    torch.testing.assert_close(cos, want)


def test_masked_positions_do_not_matter_and_num_items_splits():
    student = torch.randn(4, 6, 8, requires_grad=True)
    teacher = torch.randn(4, 6, 8)
    mask = torch.rand(4, 6) > 0.3
    base = hidden_state_loss(student, teacher, mask)
    garbage = teacher.clone()
    garbage[~mask] = float("nan")
    torch.testing.assert_close(hidden_state_loss(student, garbage, mask), base)
    n = int(mask.sum())
    parts = sum(hidden_state_loss(student[i], teacher[i], mask[i], num_items=n) for i in range(4))
    torch.testing.assert_close(parts, base)


def test_projection_learns_and_teacher_gets_no_gradient():
    torch.manual_seed(0)
    proj = HiddenProjection(6, 10)
    student = torch.randn(32, 6)
    teacher = (student @ torch.randn(6, 10)).requires_grad_(True)
    opt = torch.optim.Adam(proj.parameters(), lr=0.05)
    first = None
    for _ in range(200):
        loss = hidden_state_loss(student, teacher, projection=proj)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first
    assert teacher.grad is None


def test_equal_sizes_start_at_identity():
    proj = HiddenProjection(8, 8)
    x = torch.randn(3, 8)
    assert hidden_state_loss(x, x.clone(), projection=proj).item() == pytest.approx(0.0, abs=1e-7)


def test_errors():
    with pytest.raises(LossConfigError, match="projection"):
        hidden_state_loss(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(LossConfigError, match="kind"):
        hidden_state_loss(torch.randn(3, 4), torch.randn(3, 4), kind="l1")
    with pytest.raises(LossConfigError, match="mask"):
        hidden_state_loss(torch.randn(3, 4), torch.randn(3, 4), torch.ones(2, dtype=torch.bool))
