"""The lm-eval-harness adapter: skipped cleanly when lm-eval is missing, and its output (per
document samples, or aggregates only) turned into scores."""

import pytest

from lmdistill.eval import lm_eval_adapter
from lmdistill.eval.base import EvalSettings
from lmdistill.eval.lm_eval_adapter import LmEvalTask, parse_lm_eval_output
from lmdistill.eval.stats import wilson_interval


def test_skipped_with_a_message_when_not_installed(monkeypatch):
    monkeypatch.setattr(lm_eval_adapter, "lm_eval_available", lambda: False)
    reason = LmEvalTask("lmeval:arc_easy", "arc_easy").skip_reason()
    assert "not installed" in reason and "pip install lm-eval" in reason


def test_per_document_samples_give_wilson_intervals():
    output = {
        "results": {"arc_easy": {"acc,none": 0.75, "acc_stderr,none": 0.2}},
        "samples": {
            "arc_easy": [
                {"doc_id": i, "doc": {}, "filter": "none", "acc": a, "acc_norm": b}
                for i, (a, b) in enumerate([(1.0, 1.0), (1.0, 0.0), (0.0, 0.0), (1.0, 1.0)])
            ]
        },
    }
    primary, metrics, ids, per_example = parse_lm_eval_output(output, "arc_easy", EvalSettings())
    assert primary == "acc"
    assert ids == ["arc_easy/0", "arc_easy/1", "arc_easy/2", "arc_easy/3"]
    assert per_example == [1.0, 1.0, 0.0, 1.0]
    assert metrics["acc"].low == pytest.approx(wilson_interval(3, 4).low)
    assert metrics["acc_norm"].value == 0.5


def test_aggregates_only_give_a_normal_interval():
    output = {"results": {"mmlu": {"acc,none": 0.4, "acc_stderr,none": 0.05, "alias": "mmlu"}}}
    primary, metrics, ids, per_example = parse_lm_eval_output(output, "mmlu", EvalSettings())
    assert primary == "acc" and ids == [] and per_example == []
    assert metrics["acc"].low == pytest.approx(0.4 - 1.959964 * 0.05, abs=1e-5)
    assert metrics["acc"].method == "stderr"


def test_aggregates_carry_the_number_of_documents_lm_eval_scored():
    output = {
        "results": {"mmlu": {"acc,none": 0.4, "acc_stderr,none": 0.05}},
        "n-samples": {"mmlu": {"original": 100, "effective": 40}},
    }
    _, metrics, _, _ = parse_lm_eval_output(output, "mmlu", EvalSettings())
    assert metrics["acc"].n == 40 and metrics["acc"].method == "stderr"


@pytest.mark.parametrize("stderr", [None, "N/A", 0.0])
def test_a_score_without_a_stderr_is_marked_as_having_no_interval(stderr):
    table = {"bleu,none": 12.5}
    if stderr is not None:
        table["bleu_stderr,none"] = stderr
    output = {"results": {"wmt": table}, "n-samples": {"wmt": {"original": 30, "effective": 30}}}
    _, metrics, _, _ = parse_lm_eval_output(output, "wmt", EvalSettings())
    score = metrics["bleu"]
    assert score.method == "point" and score.n == 30
    assert score.low == score.high == score.value == 12.5
