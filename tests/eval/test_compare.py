"""Paired student-vs-model differences: the interval arithmetic, the verdicts, and the report's
table and JSON."""

import numpy as np
import pytest

from lmdistill.eval.compare import compare
from lmdistill.eval.report import comparisons_table, report_json
from lmdistill.eval.results import EvalResults, ModelInfo, ModelTaskResult, Score, TaskResult
from lmdistill.eval.stats import bootstrap_mean_interval, paired_difference_interval


def test_a_constant_gap_has_a_zero_width_interval():
    rng = np.random.default_rng(0)
    b = rng.random(50)
    d = paired_difference_interval(b + 0.1, b)
    assert d.estimate == pytest.approx(0.1)
    assert d.low == pytest.approx(0.1) and d.high == pytest.approx(0.1)


def test_pairing_is_narrower_than_the_unpaired_intervals_suggest():
    """Both models find the same examples hard: the separate intervals overlap, the paired
    difference does not include 0."""
    rng = np.random.default_rng(1)
    hardness = rng.random(80)
    a, b = hardness + 0.03, hardness + rng.normal(0, 0.01, 80)
    ia, ib = bootstrap_mean_interval(a), bootstrap_mean_interval(b)
    assert ia.low < ib.high  # overlapping
    d = paired_difference_interval(a, b)
    assert d.low > 0


def test_token_ratio_difference():
    """Per-token metrics: sum(values) / sum(tokens) per model, not a mean of per-example ratios."""
    a, a_tok = [2.0, 10.0], [1.0, 10.0]  # 12 / 11
    b, b_tok = [1.0, 1.0], [1.0, 1.0]  # 1
    d = paired_difference_interval(a, b, a_tokens=a_tok, b_tokens=b_tok)
    assert d.estimate == pytest.approx(12 / 11 - 1)
    with pytest.raises(ValueError):
        paired_difference_interval([1.0], [1.0, 2.0])


def _result(ids, rouge, kl=None, agree=None, tokens=10):
    records = [
        {
            "id": i,
            "rouge_l": r,
            "tokens": tokens,
            "kl": None if kl is None else kl[n],
            "agree": None if agree is None else agree[n],
        }
        for n, (i, r) in enumerate(zip(ids, rouge, strict=True))
    ]
    return ModelTaskResult(
        task="rel",
        model="m",
        primary="rouge_l",
        metrics={"rouge_l": Score(0, 0, 0, len(ids), "bootstrap"), "kl": Score(0, 0, 0, 1, "x")},
        example_ids=list(ids),
        per_example=list(rouge),
        records=records,
    )


@pytest.fixture
def results():
    rng = np.random.default_rng(2)
    n = 60
    ids = [f"e{i}" for i in range(n)]
    base = rng.random(n)
    agree = rng.integers(3, 8, n).astype(float)
    kl_sft = 20 + rng.random(n) * 10
    task = TaskResult(
        name="rel",
        kind="teacher_relative",
        primary="rouge_l",
        higher_is_better=True,
        description="",
        results={
            "teacher": _result(ids, [1.0] * n, [0.0] * n, [10.0] * n),
            # better ROUGE-L everywhere, lower KL everywhere, the same agreement up to noise
            "student": _result(ids, base + 0.05, kl_sft - 5, agree + rng.integers(-1, 2, n)),
            "sft-only": _result(ids, base, kl_sft, agree),
            # an older cached result without per-token sums: only the headline metric compares
            "untrained": _result(ids[::-1], list(base[::-1] - 0.5)),
        },
    )
    models = {r: ModelInfo(r, r, "f") for r in task.results}
    return EvalResults(models=models, tasks=[task], settings={"confidence": 0.95})


def test_verdicts_follow_each_metrics_direction(results):
    found = {(c.other, c.metric): c for c in compare(results)}
    assert set(found) == {
        ("sft-only", "rouge_l"),
        ("sft-only", "kl"),
        ("sft-only", "top1_agreement"),
        ("untrained", "rouge_l"),
    }
    assert found["sft-only", "rouge_l"].verdict == "better"
    assert found["sft-only", "rouge_l"].difference.value == pytest.approx(0.05)
    kl = found["sft-only", "kl"]
    assert kl.difference.value == pytest.approx(-0.5) and kl.verdict == "better"  # lower KL
    assert found["sft-only", "top1_agreement"].verdict == "no clear difference"
    # paired by id: the untrained records are in reverse order and still 0.55 behind everywhere
    untrained = found["untrained", "rouge_l"]
    assert untrained.difference.value == pytest.approx(0.55)
    assert untrained.difference.low == pytest.approx(0.55)


def test_report_shows_and_saves_the_comparisons(results):
    table = comparisons_table(results)
    assert table is not None
    assert [row[2] for row in table.rows] == ["sft-only"] * 3 + ["untrained"]
    assert table.rows[0][5] == "better" and table.rows[0][3].startswith("+0.050")
    saved = report_json(results)["comparisons"]
    assert saved[0]["against"] == "sft-only" and saved[0]["verdict"] == "better"
    assert saved[1]["metric"] == "kl" and saved[1]["higher_is_better"] is False
