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
from lmdistill.teachers.cache import TopkCache, build_cache, tokenizer_fingerprint
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
    out = tmp_path_factory.mktemp("cache") / "top8"
    build_cache(
        teacher, sft_data, out, top_k=K, max_length=64, examples_per_shard=16, progress=False
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
    torch.testing.assert_close(
        batch.teacher_logprobs[mask], online.values[mask], atol=2e-2, rtol=1e-3
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


def test_layout_and_bytes_per_token(cache_dir: Path, sft_data: Path):
    index = json.loads((cache_dir / "index.json").read_text())
    assert index["top_k"] == K and index["id_dtype"] == "uint16"  # a vocabulary of 384 ids
    assert sorted(index["shards"]) == [
        "shard-00000",
        "shard-00001",
        "shard-00002",
    ]  # 48 records / 16
    positions = sum(s["positions"] for s in index["shards"].values())
    size = sum(s["bytes"] for s in index["shards"].values())
    assert 0 < size / positions < K * 4 + 8  # 2-byte ids + 2-byte log-probs per slot, small headers
    ids = np.load(cache_dir / "shard-00000.ids.npy", mmap_mode="r")
    assert ids.shape[1] == K


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
        build_cache(
            teacher, sft_data, out, top_k=K, max_length=64, examples_per_shard=16, progress=False
        )
    assert list(json.loads((out / "index.json").read_text())["shards"]) == ["shard-00000"]
    with pytest.raises(UserError, match="incomplete"):
        TopkCache(out).check_compatible(teacher.tokenizer, sft_data, 64)
    report = build_cache(
        teacher, sft_data, out, top_k=K, max_length=64, examples_per_shard=16, progress=False
    )
    assert report.shards_skipped == 1 and calls == [0, 1, 1, 2]
    for name in ("shard-00001.ids.npy", "shard-00002.logprobs.npy"):
        assert np.array_equal(np.load(out / name), np.load(cache_dir / name))
    with pytest.raises(UserError, match="other settings \\(top_k differ\\)"):
        build_cache(
            teacher, sft_data, out, top_k=4, max_length=64, examples_per_shard=16, progress=False
        )


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
