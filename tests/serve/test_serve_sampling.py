"""The engine's per-row sampling and stop-string helpers, against independent references."""

from __future__ import annotations

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from lmdistill.serve.sampling import (
    SamplingOptions,
    choose_token,
    find_stop,
    held_back,
    process_logits,
)


def logits(seed: int = 0, vocab: int = 50) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 3


def draws(options: SamplingOptions, row: torch.Tensor, count: int = 400) -> list[int]:
    generator = torch.Generator().manual_seed(0)
    return [choose_token(row, options, generator) for _ in range(count)]


def test_temperature_below_1e_5_is_greedy_without_nan() -> None:
    row = logits()
    for temperature in (0.0, 1e-40, 9e-6):
        options = SamplingOptions(max_tokens=1, temperature=temperature)
        assert set(draws(options, row, 20)) == {int(row.argmax())}


def test_top_k_keeps_only_the_k_most_likely() -> None:
    row = logits()
    top3 = set(row.topk(3).indices.tolist())
    chosen = set(draws(SamplingOptions(max_tokens=1, top_k=3), row))
    assert chosen <= top3 and len(chosen) > 1


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    row = logits(1)
    probs = torch.softmax(row, -1)
    order = probs.argsort(descending=True)
    mass = probs[order].cumsum(0)
    nucleus = set(order[: int((mass < 0.6).sum()) + 1].tolist())
    chosen = set(draws(SamplingOptions(max_tokens=1, top_p=0.6), row))
    assert (chosen <= nucleus and len(chosen) > 1) or len(nucleus) == 1


def test_min_p_drops_tokens_below_a_fraction_of_the_best() -> None:
    row = logits(2)
    probs = torch.softmax(row, -1)
    allowed = set(torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist())
    assert set(draws(SamplingOptions(max_tokens=1, min_p=0.2), row)) <= allowed


def test_the_same_generator_state_draws_the_same_token() -> None:
    options = SamplingOptions(max_tokens=1)
    a = draws(options, logits(), 30)
    assert a == draws(options, logits(), 30)
    assert len(set(a)) > 1  # it does sample


def test_repetition_penalty_matches_transformers() -> None:
    row, prompt, output = logits(3), [1, 2, 3], [3, 7]
    options = SamplingOptions(max_tokens=1, repetition_penalty=1.7)
    ours = process_logits(row, options, prompt, output, [])
    reference = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + output]), row[None])
    torch.testing.assert_close(ours, reference[0])


def test_presence_and_frequency_penalties_follow_openai() -> None:
    row, output = logits(4), [5, 5, 9]
    options = SamplingOptions(max_tokens=1, presence_penalty=0.5, frequency_penalty=0.25)
    out = process_logits(row, options, [1], output, [])
    expected = row.clone()
    expected[5] -= 2 * 0.25 + 0.5
    expected[9] -= 1 * 0.25 + 0.5
    torch.testing.assert_close(out, expected)


def test_min_tokens_bans_end_tokens_until_reached() -> None:
    row = logits(5)
    options = SamplingOptions(max_tokens=5, min_tokens=2)
    early = process_logits(row, options, [1], [4], [7, 8])
    assert torch.isinf(early[[7, 8]]).all() and torch.isfinite(early[:7]).all()
    late = process_logits(row, options, [1], [4, 4], [7, 8])
    torch.testing.assert_close(late, row)


def test_logit_bias_and_allowed_token_ids() -> None:
    row = logits(6)
    options = SamplingOptions(max_tokens=1, logit_bias=((3, 100.0),), allowed_token_ids=(3, 4))
    out = process_logits(row, options, [], [], [])
    assert out[3] == row[3] + 100 and out[4] == row[4]
    assert torch.isinf(out[[0, 1, 2, 5]]).all()


@pytest.mark.parametrize(
    ("text", "stops", "searched", "expected"),
    [
        ("hello world", ("wor",), 0, (6, "wor")),
        ("hello world", ("xyz",), 0, None),
        ("hello world", ("o", "ll"), 0, (2, "ll")),  # the earliest match wins
        ("hello world", ("hello",), 9, None),  # already ruled out before `searched`
        ("hello world", ("lo w",), 6, (3, "lo w")),  # straddles what was searched
    ],
)
def test_find_stop(
    text: str, stops: tuple[str, ...], searched: int, expected: tuple[int, str] | None
) -> None:
    assert find_stop(text, stops, searched) == expected


def test_held_back_covers_a_possible_stop_start_and_partial_characters() -> None:
    assert held_back("the end", ("ending",)) == 3  # "end" may grow into "ending"
    assert held_back("the end", ("xyz",)) == 0
    assert held_back("caf\ufffd", ()) == 1
