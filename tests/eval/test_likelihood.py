"""Continuation log-probs from padded batches equal those of each sequence alone, and a plain
forward pass of the model; batches respect their token budget."""

import pytest
import torch
from eval_fakes import ScriptedTeacher

from lmdistill.errors import UserError
from lmdistill.eval.likelihood import (
    as_scoring_model,
    continuation_log_probs,
    gather_token_log_probs,
    plan_batches,
)
from lmdistill.teachers.local import HFTeacher


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> HFTeacher:
    return HFTeacher(tiny_model_dir, device="cpu")


def test_batched_equals_alone_and_a_plain_forward(tiny):
    contexts = [
        tiny.encode_chat([{"role": "user", "content": p}]) for p in ("Hi", "What is 2 + 3?")
    ]
    continuations = [[5, 6, 7, 8, 9], [10, 11]]
    batched = continuation_log_probs(tiny, contexts, continuations)
    for context, continuation, got in zip(contexts, continuations, batched, strict=True):
        (alone,) = continuation_log_probs(tiny, [context], [continuation])
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            logits = tiny.model(input_ids=ids).logits[0].double()
        reference = torch.log_softmax(logits, -1)[len(context) - 1 : -1]
        assert got.shape == (len(continuation), tiny.model.config.vocab_size)
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.double(), reference, atol=1e-5, rtol=0)
        lp = gather_token_log_probs(got, continuation)
        assert lp.tolist() == pytest.approx(
            [float(reference[j, t]) for j, t in enumerate(continuation)], abs=1e-5
        )


def test_plan_batches_covers_everything_within_budget():
    lengths = [5, 40, 12, 12, 3, 100, 7]
    batches = plan_batches(lengths, token_budget=48, max_rows=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        widest = max(lengths[i] for i in batch)
        assert len(batch) <= 3
        assert len(batch) == 1 or widest * len(batch) <= 48


def test_a_text_only_model_is_refused():
    with pytest.raises(UserError, match="cannot give full_logits"):
        as_scoring_model(ScriptedTeacher(lambda m, s: ""), "multiple-choice scoring")
