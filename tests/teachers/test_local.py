"""HFTeacher on tiny offline models: batched generation, padding, sampling, logits and top-k."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from lmdistill.errors import UserError
from lmdistill.teachers import local
from lmdistill.teachers.base import Capability, SamplingParams
from lmdistill.teachers.local import HFTeacher, left_pad, split_at_eos

PROMPTS = [
    "Hello",
    "What is 2 + 3?",
    "The capital of France",
    "explain photosynthesis",
    "0 1 2 3",
    "A teacher model distills knowledge into a smaller student model.",
    "Hi",
    "How are you today?",
]
CONVERSATIONS = [[{"role": "user", "content": p}] for p in PROMPTS]
MAX_TOKENS = 12


def _liven(model: torch.nn.Module, eos_id: int) -> None:
    """Larger random weights and a boosted EOS embedding, in place.

    Freshly initialised (std 0.02), a tiny model answers every prompt with the same token and never
    ends, so batching or padding bugs would go unseen. With std 0.3 its greedy output depends on
    the prompt, and the EOS boost makes some rows stop early while others hit the length limit."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        model.get_input_embeddings().weight[eos_id] *= 2.0


@pytest.fixture(scope="module")
def lively_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama, livened up (see `_liven`)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    _liven(model, tokenizer.eos_token_id)
    out = tmp_path_factory.mktemp("lively-lm")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def gpt2_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 with the same tokenizer. Unlike RoPE (where shifting every position of a row
    changes nothing), its learned absolute positions make left padding wrong unless position ids
    are counted from each row's first real token."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=256,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    _liven(model, tokenizer.eos_token_id)
    out = tmp_path_factory.mktemp("tiny-gpt2")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def teacher(lively_model_dir: Path) -> HFTeacher:
    return HFTeacher(lively_model_dir, batch_size=8)


def reference_greedy(teacher: HFTeacher, messages: list[dict], max_tokens: int) -> list[int]:
    """Generated ids (EOS included if reached) by the plainest possible decoding: one unpadded
    sequence, a full forward pass per token (no KV cache), argmax, stop at EOS."""
    ids = torch.tensor([teacher.encode_chat(messages)])
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            next_id = int(teacher.model(input_ids=ids).logits[0, -1].argmax())
            generated.append(next_id)
            if next_id in teacher.eos_ids:
                break
            ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
    return generated


def reference_summary(
    teacher: HFTeacher, messages: list[dict], max_tokens: int
) -> tuple[str, str, int]:
    generated = reference_greedy(teacher, messages, max_tokens)
    stopped = generated[-1] in teacher.eos_ids
    content = generated[:-1] if stopped else generated
    text = teacher.tokenizer.decode(content, skip_special_tokens=True)
    return text, "stop" if stopped else "length", len(generated)


def by_index(results: list) -> list:
    return sorted(results, key=lambda r: r.index)


def summary(teacher: HFTeacher, params: SamplingParams) -> list[tuple[str, str, int]]:
    results = by_index(list(teacher.iter_generate(CONVERSATIONS, params)))
    return [
        (r.generations[0].text, r.generations[0].finish_reason, r.generations[0].completion_tokens)
        for r in results
    ]


def test_capabilities() -> None:
    assert HFTeacher.capabilities == (
        Capability.TEXT
        | Capability.FULL_LOGITS
        | Capability.TOPK_LOGPROBS
        | Capability.CONTINUATION
    )


def test_left_pad_puts_tokens_on_the_right() -> None:
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_split_at_eos_ignores_batch_padding_after_eos() -> None:
    # EOS (2) at position 2, then padding that happens to include another EOS and other ids.
    assert split_at_eos([10, 11, 2, 9, 2], eos_ids=[2]) == ([10, 11], "stop", 3)
    assert split_at_eos([10, 11, 12], eos_ids=[2]) == ([10, 11, 12], "length", 3)


@pytest.mark.parametrize("model_dir", ["lively_model_dir", "gpt2_model_dir"])
def test_batched_greedy_matches_one_at_a_time(
    model_dir: str, request: pytest.FixtureRequest
) -> None:
    path = request.getfixturevalue(model_dir)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    batched = summary(HFTeacher(path, batch_size=8), params)
    single = summary(HFTeacher(path, batch_size=1), params)
    assert batched == single
    assert len({text for text, _, _ in batched}) > 1  # the prompts really lead to different outputs


def test_greedy_matches_step_by_step_reference(teacher: HFTeacher) -> None:
    # Left-padded, KV-cached, batched decoding must equal unpadded, uncached decoding row by row.
    batched = summary(teacher, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    reference = [reference_summary(teacher, conv, MAX_TOKENS) for conv in CONVERSATIONS]
    assert batched == reference


def test_greedy_in_two_passes_matches_one(
    lively_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Answers still going after the first pass are continued from prompt + tokens so far; each
    # must equal the plain step-by-step decoding, whichever pass it ended in.
    monkeypatch.setattr(local, "FIRST_PASS_TOKENS", 3)
    teacher = HFTeacher(lively_model_dir, batch_size=4)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    assert local._two_passes(params)
    two = summary(teacher, params)
    first_batches = -(-len(CONVERSATIONS) // 4)
    assert teacher.generate_calls > first_batches  # a second pass ran
    assert any(tokens <= 3 for _, _, tokens in two)  # and some answers ended in the first
    assert two == [reference_summary(teacher, conv, MAX_TOKENS) for conv in CONVERSATIONS]
    monkeypatch.setattr(local, "FIRST_PASS_TOKENS", MAX_TOKENS)  # one pass only
    assert not local._two_passes(params) and summary(teacher, params) == two


def test_finish_reason_stop_vs_length(teacher: HFTeacher) -> None:
    rows = summary(teacher, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    reasons = {reason for _, reason, _ in rows}
    assert reasons == {"stop", "length"}  # this fixture ends some rows early, not all
    for _, reason, completion_tokens in rows:
        if reason == "length":
            assert completion_tokens == MAX_TOKENS
        else:
            assert 1 <= completion_tokens <= MAX_TOKENS


def test_prompt_tokens_count_the_templated_prompt(teacher: HFTeacher) -> None:
    results = by_index(list(teacher.iter_generate(CONVERSATIONS[:3], SamplingParams(max_tokens=2))))
    for result, conv in zip(results, CONVERSATIONS[:3], strict=True):
        assert result.generations[0].prompt_tokens == len(teacher.encode_chat(conv))
        assert result.generations[0].latency_s > 0


def test_encode_chat_uses_the_template_without_a_second_bos(teacher: HFTeacher) -> None:
    ids = teacher.encode_chat([{"role": "user", "content": "Hello"}])
    assert (
        teacher.tokenizer.decode(ids)
        == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )


def test_n_samples_per_prompt_differ_and_repeat_with_seed(teacher: HFTeacher) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=8, n=3, seed=123)
    first = by_index(list(teacher.iter_generate(CONVERSATIONS[:2], params)))
    again = by_index(list(teacher.iter_generate(CONVERSATIONS[:2], params)))
    assert [len(r.generations) for r in first] == [3, 3]
    assert len({g.text for g in first[0].generations}) > 1  # three real samples, not one copied
    assert [[g.text for g in r.generations] for r in first] == [
        [g.text for g in r.generations] for r in again
    ]


def test_greedy_samples_belong_to_their_own_prompt(teacher: HFTeacher) -> None:
    # Greedy n=2 repeats each prompt's single answer: a mix-up of rows between prompts shows.
    single = summary(teacher, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    results = by_index(
        list(teacher.iter_generate(CONVERSATIONS, SamplingParams(max_tokens=MAX_TOKENS, n=2)))
    )
    for result, (text, _, _) in zip(results, single, strict=True):
        assert [g.text for g in result.generations] == [text, text]


def test_seeded_sampling_leaves_global_rng_alone(teacher: HFTeacher) -> None:
    state = torch.get_rng_state()
    list(teacher.iter_generate(CONVERSATIONS[:1], SamplingParams(temperature=1.0, seed=7)))
    assert torch.equal(torch.get_rng_state(), state)


def test_batch_size_counts_sequences_and_results_stream(lively_model_dir: Path) -> None:
    teacher = HFTeacher(lively_model_dir, batch_size=4)
    params = SamplingParams(temperature=1.0, max_tokens=3, n=2)  # 4 // 2 = 2 prompts per batch
    stream = teacher.iter_generate(CONVERSATIONS[:6], params)
    first = [next(stream), next(stream)]
    assert teacher.generate_calls == 1  # the first batch is yielded before the next one runs
    rest = list(stream)
    assert teacher.generate_calls == 3
    assert sorted(r.index for r in first + rest) == list(range(6))


def test_batches_group_prompts_of_similar_length(lively_model_dir: Path) -> None:
    teacher = HFTeacher(lively_model_dir, batch_size=2)
    results = list(teacher.iter_generate(CONVERSATIONS, SamplingParams(max_tokens=1)))
    lengths = [r.generations[0].prompt_tokens for r in results]
    assert lengths == sorted(lengths, reverse=True)  # longest first, so each batch pads little


def test_bad_conversation_fails_alone(teacher: HFTeacher) -> None:
    bad = [{"role": "user", "content": None}]  # the template cannot add None to a string
    results = by_index(list(teacher.iter_generate([bad, *CONVERSATIONS[:2]], SamplingParams())))
    assert results[0].failure is not None and results[0].failure.reason == "bad_request"
    assert all(r.failure is None and r.generations for r in results[1:])


def test_prompt_longer_than_context_fails(teacher: HFTeacher) -> None:
    long = [{"role": "user", "content": "Hello world! " * 200}]  # > 256 positions
    (result,) = teacher.iter_generate([long], SamplingParams())
    assert result.failure is not None and result.failure.reason == "prompt_too_long"


def _padded_batch(teacher: HFTeacher) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    seqs = [teacher.encode_chat(c) for c in CONVERSATIONS[:3]]
    ids, mask = left_pad(seqs, teacher.pad_id)
    return seqs, ids, mask


@pytest.mark.parametrize("model_dir", ["lively_model_dir", "gpt2_model_dir"])
def test_logits_of_padded_rows_match_unpadded(
    model_dir: str, request: pytest.FixtureRequest
) -> None:
    teacher = HFTeacher(request.getfixturevalue(model_dir))
    seqs, ids, mask = _padded_batch(teacher)
    logits = teacher.logits(ids, mask)
    assert logits.shape == (*ids.shape, teacher.model.config.vocab_size)
    assert logits.dtype == torch.float32
    for row, seq in enumerate(seqs):
        alone = teacher.logits(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long))
        torch.testing.assert_close(logits[row, -len(seq) :], alone[0], atol=1e-5, rtol=1e-5)


def test_logits_with_right_padding_match_unpadded(teacher: HFTeacher) -> None:
    seq = teacher.encode_chat(CONVERSATIONS[0])
    ids = torch.tensor([[*seq, teacher.pad_id, teacher.pad_id]])
    mask = torch.tensor([[1] * len(seq) + [0, 0]])
    alone = teacher.logits(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long))
    torch.testing.assert_close(teacher.logits(ids, mask)[0, : len(seq)], alone[0])


def test_topk_logprobs_match_log_softmax_of_logits(teacher: HFTeacher) -> None:
    _, ids, mask = _padded_batch(teacher)
    top_ids, top_logprobs = teacher.topk_logprobs(ids, mask, k=5)
    assert top_ids.shape == top_logprobs.shape == (*ids.shape, 5)
    assert top_ids.dtype == torch.int64
    reference = torch.log_softmax(teacher.logits(ids, mask).double(), dim=-1)
    torch.testing.assert_close(
        top_logprobs.double(), reference.gather(-1, top_ids), atol=1e-5, rtol=1e-5
    )
    assert torch.all(top_logprobs[..., :-1] >= top_logprobs[..., 1:])  # best first
    # They are the k best: the reference's (k+1)-th best is no better than the k-th returned.
    next_best = reference.topk(6, dim=-1).values[..., -1]
    assert torch.all(next_best <= top_logprobs[..., -1].double() + 1e-6)


def test_topk_with_k_equal_vocab_is_the_full_distribution(teacher: HFTeacher) -> None:
    _, ids, mask = _padded_batch(teacher)
    vocab = teacher.model.config.vocab_size
    _, top_logprobs = teacher.topk_logprobs(ids, mask, k=vocab)
    total = torch.logsumexp(top_logprobs.double(), dim=-1)
    torch.testing.assert_close(total, torch.zeros_like(total), atol=1e-5, rtol=0)


def test_topk_rejects_bad_k(teacher: HFTeacher) -> None:
    _, ids, mask = _padded_batch(teacher)
    with pytest.raises(UserError, match="k must be"):
        teacher.topk_logprobs(ids, mask, k=0)


def _forced_logprobs(teacher: HFTeacher, ids: list[int]) -> torch.Tensor:
    """(T, V) log-probs of a forward pass over `ids`; row t predicts token t + 1."""
    seq = torch.tensor([ids])
    return torch.log_softmax(teacher.logits(seq, torch.ones_like(seq)), dim=-1)[0]


def test_greedy_logprobs_match_teacher_forcing(teacher: HFTeacher) -> None:
    # Recorded during KV-cached decoding; a forward pass over prompt + completion must agree.
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, top_logprobs=3)
    (result,) = teacher.iter_generate(CONVERSATIONS[:1], params)
    generation = result.generations[0]
    assert generation.top_logprobs is not None and generation.token_logprobs is not None
    prompt = teacher.encode_chat(CONVERSATIONS[0])
    generated = reference_greedy(teacher, CONVERSATIONS[0], MAX_TOKENS)
    content = [t for t in generated if t not in teacher.eos_ids]
    assert len(generation.token_logprobs) == len(generation.top_logprobs) == len(content)
    forced = _forced_logprobs(teacher, prompt + content)
    for step, token_id in enumerate(content):
        row = forced[len(prompt) - 1 + step]
        token, logprob = generation.token_logprobs[step]
        assert (token, logprob) == (
            teacher.token_text(token_id),
            pytest.approx(float(row[token_id]), abs=1e-4),
        )
        top_values, top_ids = row.topk(3)
        assert [t for t, _ in generation.top_logprobs[step]] == [
            teacher.token_text(int(i)) for i in top_ids
        ]
        assert generation.top_ids is not None and generation.top_ids[step] == top_ids.tolist()
        assert generation.token_ids is not None and generation.token_ids[step] == token_id
        assert [lp for _, lp in generation.top_logprobs[step]] == pytest.approx(
            top_values.tolist(), abs=1e-4
        )


def test_sampled_logprobs_are_the_temperature_one_distribution(teacher: HFTeacher) -> None:
    # Sampling at temperature 0.5 must still report the model's own distribution, not the
    # sharpened one: compare the first step with a plain forward pass over the prompt.
    params = SamplingParams(temperature=0.5, max_tokens=3, top_logprobs=4, seed=0)
    (result,) = teacher.iter_generate(CONVERSATIONS[1:2], params)
    generation = result.generations[0]
    assert (
        generation.top_logprobs and generation.token_logprobs
    )  # this prompt does not stop at once
    row = _forced_logprobs(teacher, teacher.encode_chat(CONVERSATIONS[1]))[-1]
    top_values, _ = row.topk(4)
    assert [lp for _, lp in generation.top_logprobs[0]] == pytest.approx(
        top_values.tolist(), abs=1e-4
    )
    token, logprob = generation.token_logprobs[0]
    matches = [i for i in range(row.shape[0]) if abs(float(row[i]) - logprob) < 1e-4]
    assert token in {teacher.token_text(i) for i in matches}


def test_token_text_keeps_partial_utf8_bytes(teacher: HFTeacher) -> None:
    # 'é' is two bytes (c3 a9); in this byte-level vocab the lone byte c3 is its own token.
    lone = teacher.tokenizer.convert_tokens_to_ids("Ã")  # byte-level alphabet char for 0xc3
    assert teacher.token_text(lone) == "bytes:\\xc3"


def test_training_mode_is_restored(lively_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(lively_model_dir).train()
    tokenizer = AutoTokenizer.from_pretrained(lively_model_dir)
    teacher = HFTeacher(model, tokenizer=tokenizer)
    list(teacher.iter_generate(CONVERSATIONS[:1], SamplingParams(max_tokens=2)))
    assert model.training


def test_model_object_needs_a_tokenizer(lively_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(lively_model_dir)
    with pytest.raises(TypeError, match="tokenizer"):
        HFTeacher(model)


def test_not_a_model_dir_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no config\.json"):
        HFTeacher(tmp_path)


def test_unknown_dtype_is_a_user_error(lively_model_dir: Path) -> None:
    with pytest.raises(UserError, match="unknown dtype 'float17'"):
        HFTeacher(lively_model_dir, dtype="float17")


@pytest.mark.parametrize("damage", ["no weights", "no tokenizer", "empty config", "torn weights"])
def test_a_model_dir_an_interrupted_save_left_is_a_one_line_error(
    tmp_path: Path, tiny_model_dir: Path, damage: str
):
    """What an in-place save killed at some moment leaves (issue 19): a UserError naming the dir,
    from the teacher loader and the student loader alike, never a raw traceback."""
    import shutil

    from lmdistill.teachers.registry import load_teacher
    from lmdistill.training.students import load_model_dir

    broken = tmp_path / "final"
    shutil.copytree(tiny_model_dir, broken)
    if damage == "no weights":
        (broken / "model.safetensors").unlink()
    elif damage == "no tokenizer":
        (broken / "tokenizer.json").unlink()
        (broken / "tokenizer_config.json").unlink()
    elif damage == "empty config":
        (broken / "config.json").write_text("")
    else:
        weights = broken / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    for load in (lambda: load_teacher(str(broken)), lambda: load_model_dir(broken)):
        with pytest.raises(UserError, match=rf"^{broken}: cannot load the model \(.+\); if a run"):
            load()
