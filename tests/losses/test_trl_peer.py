"""Our divergences against a peer: TRL's GKD loss (`GKDTrainer.generalized_jsd_loss`, the loss
its on-policy distillation trains with), given the same student samples and logits.

TRL's beta weighs the mixture m = beta * teacher + (1 - beta) * student as ours does; its
beta = 0 is KL(teacher || student) (our forward_kl) and beta = 1 is KL(student || teacher) (our
reverse_kl). It has no T^2 factor, so ours is divided by T^2 before comparing, and it divides by
the number of unmasked positions, as our reduction rule does."""

from __future__ import annotations

import os

import pytest
import torch

from lmdistill.losses import distillation_loss, fused_distillation_loss

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")


def ours_name(beta: float) -> tuple[str, float]:
    if beta == 0:
        return "forward_kl", 0.5
    if beta == 1:
        return "reverse_kl", 0.5
    return "jsd", beta


def sample_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 7, 50, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(2, 7, 50, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 50, (2, 7), generator=g)
    labels[0, :3] = -100  # the prompt
    labels[1, 5:] = -100  # padding
    return student, teacher, labels


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_value_and_gradient_equal_trls_generalized_jsd(beta: float, temperature: float):
    student, teacher, labels = sample_inputs()
    divergence, our_beta = ours_name(beta)
    a = student.clone().requires_grad_(True)
    ours = distillation_loss(
        a, teacher, labels, divergence=divergence, beta=our_beta, temperature=temperature, alpha=1.0
    ) / (temperature**2)
    b = student.clone().requires_grad_(True)
    theirs = gkd.GKDTrainer.generalized_jsd_loss(
        b, teacher, labels=labels, beta=beta, temperature=temperature
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_the_fused_loss_the_trainer_uses_equals_trls_on_the_same_logits(beta: float):
    """The training loop never materializes logits: hidden states and LM heads go into the fused
    loss. Its value on them equals TRL's on the logits they make."""
    g = torch.Generator().manual_seed(1)
    hs, ht = torch.randn(2, 7, 16, generator=g), torch.randn(2, 7, 24, generator=g)
    ws, wt = torch.randn(50, 16, generator=g), torch.randn(50, 24, generator=g)
    _, _, labels = sample_inputs()
    divergence, our_beta = ours_name(beta)
    ours = fused_distillation_loss(
        hs, ws, ht, wt, labels, divergence=divergence, beta=our_beta, temperature=1.0, alpha=1.0
    )
    theirs = gkd.GKDTrainer.generalized_jsd_loss(hs @ ws.T, ht @ wt.T, labels=labels, beta=beta)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
