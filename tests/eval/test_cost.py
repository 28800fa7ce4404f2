"""Cost: exact parameter counts for the tiny model (tied and untied), disk size, the measuring
subprocesses, the teacher / student ratios over interleaved rounds, and the right order under a
CPU hog."""

import subprocess
import sys

import pytest
from tiny import make_tiny_model, make_tokenizer, save_tiny_model_dir
from transformers import GPT2Config, GPT2LMHeadModel

from lmdistill.errors import UserError
from lmdistill.eval.cost import (
    cost_report,
    count_parameters,
    dir_size,
    measure,
    measure_models,
    noise,
    reductions,
    spreads,
)
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
    data = measure(str(tiny_model_dir), new_tokens=4, batch_size=2, rounds=2)
    expected_total, expected_non_embedding = llama_count(len(make_tokenizer()), 32, 2, tied=True)
    assert data["params_total"] == expected_total
    assert data["params_non_embedding"] == expected_non_embedding
    assert data["disk_bytes"] == dir_size(tiny_model_dir) > 0
    for key in ("latency_per_token_s", "tokens_per_s", "peak_rss_bytes", "load_s"):
        assert data[key] > 0, key
    assert data["peak_rss_bytes"] >= data["model_memory_bytes"] > 0
    assert data["new_tokens"] == 4 and data["batch_size"] == 2
    assert len(data["latency_rounds_s"]) == len(data["tokens_per_s_rounds"]) == 2


def test_timed_ratios_are_medians_of_per_round_ratios_with_their_spread():
    # Round 2 hit a burst of load while the teacher ran: its ratio stands out, the median does not.
    teacher = {"latency_rounds_s": [0.02, 0.02, 0.09], "tokens_per_s_rounds": [50.0, 40.0, 60.0]}
    student = {"latency_rounds_s": [0.01, 0.008, 0.01], "tokens_per_s_rounds": [100.0, 120.0, 60.0]}
    teacher.update(latency_per_token_s=0.02, tokens_per_s=50.0)
    student.update(latency_per_token_s=0.01, tokens_per_s=100.0)
    ratios = reductions(teacher, student)
    assert ratios["latency_per_token"] == pytest.approx(2.5)  # median of 2, 2.5, 9
    assert ratios["throughput"] == pytest.approx(2.0)  # median of 2, 3, 1
    spread = spreads(teacher, student)
    assert spread["latency_per_token"] == pytest.approx([2.0, 9.0])
    assert spread["throughput"] == pytest.approx([1.0, 3.0])


def test_noise_names_a_wide_spread_a_split_verdict_and_a_busy_machine():
    quiet = {"rounds": 5, "load_average_before": 0.3, "load_average_after": 0.5, "cpu_count": 4}
    report = {
        "spread": {
            "student": {"latency_per_token": [2.6, 2.8], "throughput": [2.0, 3.0]},
            "other": {"latency_per_token": [0.8, 1.3]},
        },
        "conditions": quiet,
    }
    assert noise(report, "student", "latency_per_token") is None
    assert "wide spread (2.00x to 3.00x)" in noise(report, "student", "throughput")
    assert "disagree on which is faster" in noise(report, "other", "latency_per_token")
    busy = {**report, "conditions": {**quiet, "load_average_after": 3.1}}
    assert (
        noise(busy, "student", "latency_per_token") == "busy machine (load average 3.1 on 4 CPUs)"
    )


def test_the_student_is_measured_faster_next_to_a_cpu_hog(tmp_path):
    """Issue #20: a busy machine once made the report call the student slower than its teacher.
    A process spinning on a CPU during the whole measurement must not flip the order of a
    12-layer teacher and a 1-layer student of the same width; only the order is asserted (and
    that the report would flag the load only if the load average says so)."""
    teacher = save_tiny_model_dir(tmp_path / "teacher", layers=12, hidden=256, heads=4)
    student = save_tiny_model_dir(tmp_path / "student", layers=1, hidden=256, heads=4)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        measured = measure_models(
            {"teacher": str(teacher), "student": str(student)},
            new_tokens=4,
            batch_size=2,
            rounds=5,
        )
    finally:
        hog.kill()
        hog.wait()
    report = cost_report(measured["models"], {}, None, "teacher", measured["conditions"])
    assert report["reduction"]["student"]["latency_per_token"] > 1
    assert report["reduction"]["student"]["throughput"] > 1
    low, high = report["spread"]["student"]["latency_per_token"]
    assert low <= report["reduction"]["student"]["latency_per_token"] <= high
    assert report["conditions"]["rounds"] == 5 and report["conditions"]["cpu_count"] >= 1


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
