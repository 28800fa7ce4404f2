"""The offline top-k teacher cache (lmdistill.teachers.cache) and training from it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import recipe

from lmdistill.cli import main
from lmdistill.data.sft import collate, load_examples
from lmdistill.errors import UserError
from lmdistill.losses import fused_sparse_distillation_loss
from lmdistill.teachers import cache as cache_module
from lmdistill.teachers.cache import (
    LOGPROB_STEP,
    TopkCache,
    build_cache,
    compact_rows,
    expand_rows,
    id_bits,
    pack_bits,
    tokenizer_fingerprint,
    unpack_bits,
)
from lmdistill.teachers.forward import forward_signals
from lmdistill.teachers.local import HFTeacher
from lmdistill.training.config import validate
from lmdistill.training.loop import train

K = 8


@pytest.fixture(scope="module")
def teacher(teacher_dir: Path) -> HFTeacher:
    return HFTeacher(teacher_dir, device="cpu")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory, teacher: HFTeacher, sft_data: Path) -> Path:
    """The compact layout keeping all K entries (mass 1): the same top-k as the online teacher."""
    out = tmp_path_factory.mktemp("cache") / "top8"
    build_cache(
        teacher,
        sft_data,
        out,
        top_k=K,
        max_length=64,
        examples_per_shard=16,
        progress=False,
        mass=1.0,
    )
    return out


@pytest.fixture(scope="module")
def exact_dir(tmp_path_factory: pytest.TempPathFactory, teacher: HFTeacher, sft_data: Path) -> Path:
    """The exact layout (format 1, what lmdistill wrote before issue #20)."""
    out = tmp_path_factory.mktemp("cache") / "exact8"
    build_cache(
        teacher,
        sft_data,
        out,
        top_k=K,
        max_length=64,
        examples_per_shard=16,
        progress=False,
        exact=True,
    )
    return out


def test_cached_top_k_loss_equals_the_online_top_k_loss(
    cache_dir: Path, teacher: HFTeacher, sft_data: Path, student_dir: Path
):
    from transformers import AutoModelForCausalLM

    examples = load_examples(sft_data, teacher.tokenizer, max_length=64).examples
    cache = TopkCache(cache_dir)
    cache.check_compatible(teacher.tokenizer, sft_data, 64)
    # A different batch layout from the one the cache was built with.
    batch = collate(examples, [[5, 1, 9], [30, 2]], pad_id=0, topk=cache.lookup)
    with torch.no_grad():
        t = forward_signals(teacher.model, batch)
        online = torch.log_softmax((t.hidden @ t.head.T).float(), dim=-1).topk(K, dim=-1)
    mask = batch.targets != -100
    assert torch.equal(batch.teacher_ids[mask], online.indices[mask])
    # Within 1/32 nat relative to the top-1, plus float16's rounding of the top-1 (~4e-3 here).
    torch.testing.assert_close(
        batch.teacher_logprobs[mask], online.values[mask], atol=LOGPROB_STEP / 2 + 5e-3, rtol=0
    )

    student = AutoModelForCausalLM.from_pretrained(student_dir)
    s = forward_signals(student, batch)
    kwargs = dict(temperature=2.0, alpha=0.7)
    cached = fused_sparse_distillation_loss(
        s.hidden, s.head, batch.teacher_ids, batch.teacher_logprobs, batch.targets, **kwargs
    )
    live = fused_sparse_distillation_loss(
        s.hidden, s.head, online.indices, online.values, batch.targets, **kwargs
    )
    torch.testing.assert_close(cached, live, atol=1e-4, rtol=1e-3)


def test_layout_and_bytes_per_token(cache_dir: Path, exact_dir: Path):
    index = json.loads((cache_dir / "index.json").read_text())
    assert index["format"] == "lmdistill.topk-cache/2"
    assert index["top_k"] == K and index["id_bits"] == 9  # a vocabulary of 384 ids
    assert sorted(index["shards"]) == [
        "shard-00000",
        "shard-00001",
        "shard-00002",
    ]  # 48 records / 16
    positions = sum(s["positions"] for s in index["shards"].values())
    entries = sum(
        len(np.load(cache_dir / f"shard-0000{s}.codes.npy", mmap_mode="r")) for s in range(3)
    )
    assert entries == positions * K  # mass 1 keeps every entry of these shallow rows
    headers = 3 * 6 * 128 + 3 * 2 * 8 * 17  # .npy headers; the per-example offsets
    payload = positions * (2 + 1 + K * (1 + 9 / 8))  # top-1, count, per entry: code + 9-bit id
    size = sum(s["bytes"] for s in index["shards"].values())
    assert payload <= size <= payload + headers + 3
    exact = json.loads((exact_dir / "index.json").read_text())
    assert exact["format"] == "lmdistill.topk-cache/1" and exact["id_dtype"] == "uint16"
    exact_size = sum(s["bytes"] for s in exact["shards"].values())
    assert exact_size >= positions * K * 4  # uint16 ids + float16 log-probs
    assert np.load(exact_dir / "shard-00000.ids.npy", mmap_mode="r").shape[1] == K


def random_topk(rows: int, vocab: int, k: int, scale: float, seed: int = 0):
    """(ids, float32 log-probs) (rows, k), best first, of random logits."""
    generator = torch.Generator().manual_seed(seed)
    logprobs = torch.log_softmax(torch.randn(rows, vocab, generator=generator) * scale, dim=-1)
    top = logprobs.topk(k, dim=-1)
    return top.indices.numpy(), top.values.numpy()


@pytest.mark.parametrize("bits", [1, 7, 8, 9, 16, 17, 18])
def test_bit_packing_round_trips_from_any_start(bits: int):
    values = np.random.default_rng(bits).integers(0, 2**bits, size=203)
    packed = pack_bits(values, bits)
    assert packed.dtype == np.uint8 and len(packed) == -(-203 * bits // 8)
    for start, count in [(0, 203), (1, 5), (7, 64), (150, 53), (202, 1), (9, 0)]:
        assert np.array_equal(
            unpack_bits(packed, bits, start, count), values[start : start + count]
        )
    with pytest.raises(ValueError, match="bits"):
        pack_bits(np.array([2**bits]), bits)


def test_id_bits_are_the_vocabulary_width():
    assert [id_bits(v) for v in (2, 384, 32_000, 49_152, 65_536, 65_537, 128_256)] == [
        1,
        9,
        15,
        16,
        16,
        17,
        17,
    ]


@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])
def test_compact_rows_round_trip_within_half_a_step(scale: float):
    ids, logprobs = random_topk(64, 1000, 32, scale)
    rows = compact_rows(ids, logprobs, mass=1.0)
    got_ids, got = expand_rows(rows.counts, rows.top1, rows.ids, rows.codes, 32)
    kept = np.isfinite(got)
    assert np.array_equal(kept.sum(axis=1), rows.counts)
    assert np.array_equal(got_ids[kept], ids[kept])
    # Relative to the top-1 (all the sparse loss sees, since it renormalises): half a step.
    relative_error = (got - got[:, :1]) - (logprobs - logprobs[:, :1])
    assert np.abs(relative_error[kept]).max() <= LOGPROB_STEP / 2 + 1e-6
    # Absolute: plus float16's rounding of the top-1 (relative 2**-11).
    bound = LOGPROB_STEP / 2 + np.abs(logprobs[:, :1]) * 2**-11 + 1e-6
    assert (np.abs(got - logprobs) <= bound)[kept].all()
    # Only entries more than 255 steps under the top-1 are dropped, and all of them are.
    deep = logprobs[:, :1] - logprobs > 255.5 * LOGPROB_STEP
    assert np.array_equal(~kept, deep)


def test_mass_keeps_the_fewest_top_tokens_that_cover_it():
    ids, logprobs = random_topk(200, 500, 32, 3.0, seed=1)
    rows = compact_rows(ids, logprobs, mass=0.9)
    cumulative = np.cumsum(np.exp(logprobs.astype(np.float64)), axis=1)
    counts = rows.counts.astype(int)
    reached = cumulative[np.arange(200), counts - 1] >= 0.9
    assert (reached | (counts == 32)).all()  # covered, or all of the top-32 kept
    before = np.where(counts > 1, cumulative[np.arange(200), np.maximum(counts - 2, 0)], 0.0)
    assert (before < 0.9).all()  # one fewer would not cover it
    assert 1 < counts.mean() < 32


def test_an_interrupted_cache_resumes_from_its_complete_shards(
    teacher: HFTeacher, sft_data: Path, tmp_path: Path, cache_dir: Path, monkeypatch
):
    original = cache_module._write_shard
    calls = []

    def fail_on_second(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(cache_module, "_write_shard", fail_on_second)
    out = tmp_path / "c"
    with pytest.raises(KeyboardInterrupt):
        build_cache(teacher, sft_data, out, top_k=K, max_length=64, examples_per_shard=16, mass=1.0)
    assert list(json.loads((out / "index.json").read_text())["shards"]) == ["shard-00000"]
    with pytest.raises(UserError, match="incomplete"):
        TopkCache(out).check_compatible(teacher.tokenizer, sft_data, 64)
    report = build_cache(
        teacher, sft_data, out, top_k=K, max_length=64, examples_per_shard=16, mass=1.0
    )
    assert report.shards_skipped == 1 and calls == [0, 1, 1, 2]
    for name in ("shard-00001.ids.npy", "shard-00002.codes.npy", "shard-00002.top1.npy"):
        assert np.array_equal(np.load(out / name), np.load(cache_dir / name))
    with pytest.raises(UserError, match="other settings \\(top_k differ\\)"):
        build_cache(teacher, sft_data, out, top_k=4, max_length=64, examples_per_shard=16, mass=1.0)
    with pytest.raises(UserError, match="other settings \\(format, id_bits, id_dtype, logprob_st"):
        build_cache(
            teacher, sft_data, out, top_k=K, max_length=64, examples_per_shard=16, exact=True
        )


def sparse_kd(cache: TopkCache, examples, student, **kwargs) -> torch.Tensor:
    batch = collate(examples, [[0, 3, 7], [12, 20], [33]], pad_id=0, topk=cache.lookup)
    s = forward_signals(student, batch)
    return fused_sparse_distillation_loss(
        s.hidden, s.head, batch.teacher_ids, batch.teacher_logprobs, batch.targets, **kwargs
    )


def test_k_equal_to_the_vocabulary_gives_the_dense_loss(
    teacher: HFTeacher, sft_data: Path, student_dir: Path, tmp_path: Path
):
    """k = V and mass 1: every token, none dropped (these rows are shallower than 15.9 nats), so
    the loss is the dense one but for the quantization: each log-prob within 1/32 nat of the
    teacher's relative to its top-1, which moves a forward KL of ~0.5 nats by far less than 1%."""
    from transformers import AutoModelForCausalLM

    from lmdistill.losses import fused_distillation_loss

    vocab = teacher.model.get_output_embeddings().weight.shape[0]
    kwargs = dict(max_length=64, examples_per_shard=16, progress=False, top_k=vocab)
    build_cache(teacher, sft_data, tmp_path / "c", mass=1.0, **kwargs)
    build_cache(teacher, sft_data, tmp_path / "e", exact=True, **kwargs)
    examples = load_examples(sft_data, teacher.tokenizer, max_length=64).examples
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    compact, exact = TopkCache(tmp_path / "c"), TopkCache(tmp_path / "e")
    assert compact.lookup(examples[3])[1].shape == (examples[3].loss_tokens, vocab)
    assert np.isfinite(compact.lookup(examples[3])[1]).all()  # nothing dropped at mass 1
    batch = collate(examples, [[0, 3, 7], [12, 20], [33]], pad_id=0)
    with torch.no_grad():
        t = forward_signals(teacher.model, batch)
    s = forward_signals(student, batch)
    loss = dict(temperature=2.0, alpha=0.7)
    dense = fused_distillation_loss(s.hidden, s.head, t.hidden, t.head, batch.targets, **loss)
    torch.testing.assert_close(
        sparse_kd(exact, examples, student, **loss), dense, rtol=1e-3, atol=0
    )
    torch.testing.assert_close(
        sparse_kd(compact, examples, student, **loss), dense, rtol=1e-2, atol=0
    )


def test_compact_and_exact_caches_give_close_losses(
    teacher: HFTeacher, sft_data: Path, student_dir: Path, exact_dir: Path, tmp_path: Path
):
    """The default compact cache (mass 0.96) against the exact one at the same k: the rows lose
    their tail beyond 96% of the probability and 1/32 nat of precision; the KD loss moves by a
    few percent at most, and the training signal points the same way (gradients aligned)."""
    from transformers import AutoModelForCausalLM

    build_cache(
        teacher,
        sft_data,
        tmp_path / "c",
        top_k=K,
        max_length=64,
        examples_per_shard=16,
        progress=False,
    )
    compact, exact = TopkCache(tmp_path / "c"), TopkCache(exact_dir)
    assert compact.index["mass"] == 0.96
    examples = load_examples(sft_data, teacher.tokenizer, max_length=64).examples
    kept = np.concatenate([np.isfinite(compact.lookup(e)[1]).sum(axis=1) for e in examples])
    assert kept.min() >= 1 and kept.max() <= K and kept.mean() < K - 1  # some rows were cut
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    losses, grads = [], []
    for cache in (compact, exact):
        student.zero_grad()
        loss = sparse_kd(cache, examples, student, temperature=1.0, alpha=1.0)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.reshape(-1) for p in student.parameters()]))
    torch.testing.assert_close(losses[0], losses[1], rtol=0.05, atol=0)
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.95


def test_an_exact_cache_of_earlier_versions_still_loads(
    exact_dir: Path, cache_dir: Path, teacher: HFTeacher, sft_data: Path
):
    """Format 1 (float16, fixed k) reads as before, and gives the compact cache's ids."""
    exact, compact = TopkCache(exact_dir), TopkCache(cache_dir)
    exact.check_compatible(teacher.tokenizer, sft_data, 64)
    examples = load_examples(sft_data, teacher.tokenizer, max_length=64).examples
    for example in examples[:10]:
        (ids, logprobs), (cids, clogprobs) = exact.lookup(example), compact.lookup(example)
        assert ids.dtype == np.uint16 and logprobs.dtype == np.float16
        assert np.array_equal(ids, cids)
        np.testing.assert_allclose(logprobs, clogprobs, atol=LOGPROB_STEP / 2 + 1e-2)


def test_an_unknown_cache_format_is_refused_with_how_to_rebuild(exact_dir: Path, tmp_path: Path):
    index = json.loads((exact_dir / "index.json").read_text())
    (tmp_path / "index.json").write_text(json.dumps({**index, "format": "lmdistill.topk-cache/0"}))
    with pytest.raises(UserError) as caught:
        TopkCache(tmp_path)
    message = str(caught.value)
    assert "\n" not in message and "'lmdistill.topk-cache/0'" in message
    assert "lmdistill cache-logits --teacher" in message and "--out NEW_DIR" in message


def test_training_refuses_a_cache_from_another_tokenizer(
    cache_dir: Path, sft_data: Path, student_dir: Path, tmp_path: Path
):
    from transformers import AutoTokenizer

    other = AutoTokenizer.from_pretrained(student_dir)
    assert (
        tokenizer_fingerprint(other)
        == json.loads((cache_dir / "index.json").read_text())["fingerprint"]
    )
    other.chat_template = other.chat_template.replace("<|im_start|>", "<|im_start|> ")
    model_dir = tmp_path / "student"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(student_dir).save_pretrained(model_dir)
    other.save_pretrained(model_dir)
    cfg = validate(
        recipe(
            tmp_path / "run",
            model_dir,
            sft_data,
            teacher={"cache": str(cache_dir)},
            objectives=[{"kind": "logits"}],
        ),
        "r",
    )
    with pytest.raises(UserError, match="made with another tokenizer"):
        train(cfg)


def test_training_from_the_cache_lowers_the_loss_without_a_teacher(
    cache_dir: Path, sft_data: Path, student_dir: Path, tmp_path: Path
):
    cfg = validate(
        recipe(
            tmp_path / "run",
            student_dir,
            sft_data,
            teacher={"cache": str(cache_dir)},
            objectives=[{"kind": "logits", "temperature": 1.0, "alpha": 0.9}],
            optim={"lr": 1e-2, "steps": 12, "warmup_steps": 1},
            eval={"every": 12},
        ),
        "r",
    )
    result = train(cfg)
    losses = [r["loss"] for r in result.history]
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0]
    assert 0 < result.eval["top1"] <= 1 and result.eval["kl"] > 0  # judged against the cache


def test_the_cli_prints_bytes_per_token(teacher_dir: Path, sft_data: Path, tmp_path: Path, capsys):
    code = main(
        [
            "cache-logits",
            "--teacher",
            str(teacher_dir),
            "--data",
            str(sft_data),
            "--top-k",
            "4",
            "--max-length",
            "64",
            "--out",
            str(tmp_path / "c"),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "bytes/token" in out and "1 shards" in out
