"""Cost: exact parameter counts for the tiny model (tied and untied), disk size, the measuring
subprocess, and the teacher / student ratios."""

import pytest
from tiny import make_tiny_model, make_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel

from lmdistill.errors import UserError
from lmdistill.eval.cost import cost_report, count_parameters, dir_size, measure, reductions
from lmdistill.teachers.base import Prices


def llama_count(vocab: int, hidden: int, layers: int, *, tied: bool) -> tuple[int, int]:
    """Parameters of tiny.make_tiny_model by hand: per layer q, k, v, o (hidden x hidden each),
    gate, up, down (hidden x 2 hidden each) and two RMSNorm weights; a final norm; embeddings."""
    per_layer = 4 * hidden * hidden + 3 * hidden * (2 * hidden) + 2 * hidden
    body = layers * per_layer + hidden
    embeddings = vocab * hidden * (1 if tied else 2)
    return body + embeddings, body


def test_tiny_llama_counts_are_exact():
    tokenizer = make_tokenizer()
    model = make_tiny_model(tokenizer)
    assert count_parameters(model) == llama_count(len(tokenizer), 32, 2, tied=True)


def test_untied_output_embedding_counts_as_embedding():
    tokenizer = make_tokenizer()
    model = make_tiny_model(tokenizer)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = type(model.lm_head.weight)(model.lm_head.weight.detach().clone())
    assert count_parameters(model) == llama_count(len(tokenizer), 32, 2, tied=False)


def test_learned_positions_count_as_embeddings():
    config = GPT2Config(vocab_size=100, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    model = GPT2LMHeadModel(config)
    total, non_embedding = count_parameters(model)
    assert total == sum(p.numel() for p in model.parameters())
    assert total - non_embedding == 100 * 8 + 16 * 8  # token and position tables (tied head)


def test_dir_size_counts_files_but_not_hidden_or_locks(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.json").write_bytes(b"y" * 5)
    (tmp_path / ".hidden").write_bytes(b"z" * 100)
    (tmp_path / "model.lock").write_bytes(b"z" * 100)
    assert dir_size(tmp_path) == 15


def test_measure_in_a_subprocess(tiny_model_dir):
    data = measure(str(tiny_model_dir), new_tokens=4, batch_size=2, repeats=1)
    expected_total, expected_non_embedding = llama_count(len(make_tokenizer()), 32, 2, tied=True)
    assert data["params_total"] == expected_total
    assert data["params_non_embedding"] == expected_non_embedding
    assert data["disk_bytes"] == dir_size(tiny_model_dir) > 0
    for key in ("latency_per_token_s", "tokens_per_s", "peak_rss_bytes", "load_s"):
        assert data[key] > 0, key
    assert data["peak_rss_bytes"] >= data["model_memory_bytes"] > 0
    assert data["new_tokens"] == 4 and data["batch_size"] == 2


def test_reductions_and_spend():
    teacher = {"params_total": 1000, "latency_per_token_s": 0.02, "tokens_per_s": 50.0}
    student = {"params_total": 100, "latency_per_token_s": 0.005, "tokens_per_s": 400.0}
    assert reductions(teacher, student) == pytest.approx(
        {"params": 10.0, "latency_per_token": 4.0, "throughput": 8.0}
    )
    report = cost_report(
        {"teacher": teacher, "student": student},
        {"teacher": (2_000_000, 500_000), "student": (2_000_000, 400_000)},
        Prices(input_per_m=1.0, output_per_m=4.0),
        "teacher",
    )
    assert report["models"]["teacher"]["spend_usd"] == pytest.approx(2.0 + 2.0)
    assert "spend_usd" not in report["models"]["student"]
    assert report["reduction"]["student"]["params"] == 10.0


def test_a_negative_price_is_refused_in_one_line():
    with pytest.raises(UserError, match="prices must be >= 0"):
        Prices(input_per_m=-1.0)
