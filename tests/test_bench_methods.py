"""bench/methods.py's own logic: every method's training recipe validates, and the table's
verdicts and JSON line come from the pooled paired intervals. (Its full run needs the bundled
teacher and ~90 minutes: it is a benchmark, not a test.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import methods

from lmdistill.training.config import validate


@pytest.mark.parametrize("method", methods.ALL_METHODS)
def test_every_methods_training_recipe_validates(tmp_path: Path, method: str):
    bench = methods.Bench(out=tmp_path, seeds=(0,), methods=(method,))
    paths = methods.data_paths(bench)
    config = validate(
        methods.method_config(bench, method, 0, paths, tmp_path / "student", sft_steps=78),
        method,
    )
    if method != "sft":  # the same optimizer steps as SFT (opd: its own continuation)
        assert config.optim.steps == (bench.opd_steps if method.startswith(("opd", "skd")) else 78)
    on_policy = method in ("gkd", "skd", "distillm") or method.startswith("opd")
    assert (config.on_policy is not None) == on_policy
    if method == "opd_finished":
        assert config.on_policy.drop_unfinished
    if method == "opd_mix":  # half the steps on the data, with CE beside the reverse KL
        assert config.on_policy.lambda_ == 0.5 and config.objectives[0].alpha == 0.5


def fake_run(method: str, seed: int, rouge: np.ndarray, agree: np.ndarray) -> dict:
    ids = [f"e{i}" for i in range(len(rouge))]
    return {
        "method": method,
        "seed": seed,
        "train_seconds": 60.0,
        "steps": 78,
        "ids": ids,
        "rouge_l": rouge.tolist(),
        "agree": agree.tolist(),
        "kl": (10 - agree).tolist(),
        "tokens": [10.0] * len(ids),
        "task_scores": {"t0": 0.0, "t1": 1.0},
        "teacher_task": 0.5,
    }


def test_the_table_calls_a_consistent_gain_better_a_loss_worse_and_noise_a_tie():
    rng = np.random.default_rng(0)
    results: dict[str, dict[int, dict]] = {"sft": {}, "up": {}, "down": {}, "same": {}}
    for seed in (0, 1, 2):
        rouge, agree = rng.random(200), rng.integers(0, 10, 200).astype(float)
        results["sft"][seed] = fake_run("sft", seed, rouge, agree)
        results["up"][seed] = fake_run("up", seed, rouge, np.minimum(agree + 1, 10))
        results["down"][seed] = fake_run("down", seed, rouge - 0.1, agree)
        noise = rng.normal(0, 0.05, 200)
        results["same"][seed] = fake_run("same", seed, rouge + noise, agree)
    summary = methods.summarize(
        methods.Bench(out=Path("."), seeds=(0, 1, 2), methods=()), results, 1.0
    )
    rows = {r["method"]: r for r in summary["rows"]}
    assert "vs_sft" not in rows["sft"]
    assert rows["up"]["vs_sft"]["top1"]["verdict"] == "better"
    assert rows["up"]["vs_sft"]["kl"]["verdict"] == "better"  # lower KL is better
    assert rows["down"]["vs_sft"]["rouge_l"]["verdict"] == "worse"
    assert rows["same"]["vs_sft"]["rouge_l"]["verdict"] == "tie"
    line = methods.headline(summary, (0, 1, 2))
    assert set(line) == {
        "best_method",
        "best_vs_sft_rouge_l",
        "best_vs_sft_rouge_l_low",
        "best_vs_sft_top1",
        "opd_vs_sft_rouge_l",
        "skd_vs_sft_rouge_l",
        "best_task_retention",
        "seeds",
        "minutes",
    }
    assert line["best_method"] in ("up", "same")  # the highest ROUGE-L lower bound
    assert line["best_task_retention"] == 1.0 and line["seeds"] == 3
    json.dumps(line)
    assert "| up | 3 |" in methods.markdown(summary)


def test_a_student_construction_other_than_the_default_gets_its_own_results_and_runs():
    plain = methods.Bench(out=Path("o"), seeds=(0,), methods=())
    assert plain.tag == "" and plain.results_dir() == Path("o/results")
    healthy = methods.Bench(
        out=Path("o"), seeds=(0,), methods=(), student="importance", heal_steps=20
    )
    assert healthy.tag == "importance7-heal20"
    assert healthy.results_dir() == Path("o/results/importance7-heal20")
    assert healthy.runs_dir() == Path("o/runs/importance7-heal20")
    start = {
        "construction": "importance7",
        "layers": [0, 1, 2],
        "calibration_kl": 3.5,
        "rouge_l": [0.2, 0.4],
        "agree": [1.0, 3.0],
        "kl": [4.0, 8.0],
        "tokens": [2.0, 6.0],
    }
    s = methods.start_summary(start)
    assert s["top1"] == pytest.approx(0.5) and s["kl"] == pytest.approx(1.5)
    assert "starts at held-out KL 1.50" in methods.markdown({"rows": [], "start": s})


def test_the_everyday_rows_pool_the_everyday_scores_over_seeds():
    """--everyday (issue #21): each method's everyday held-out ROUGE-L and its difference from
    SFT come from the runs' `everyday` records, through the same pooled interval."""
    rng = np.random.default_rng(1)
    results: dict[str, dict[int, dict]] = {"sft": {}, "down": {}}
    for seed in (0, 1):
        rouge, agree = rng.random(100), rng.integers(0, 10, 100).astype(float)
        for method, shift in (("sft", 0.0), ("down", -0.2)):
            run = fake_run(method, seed, rng.random(50), rng.random(50))
            run["everyday"] = fake_run(method, seed, rouge + shift, agree)
            results[method][seed] = run
    table = methods.everyday_rows(results)
    expected = methods.vs_sft(
        [results["down"][s]["everyday"] for s in (0, 1)],
        [results["sft"][s]["everyday"] for s in (0, 1)],
        "rouge_l",
    )
    assert expected.verdict == "worse" and expected.value == pytest.approx(-0.2)
    mean = np.mean([np.mean(results["down"][s]["everyday"]["rouge_l"]) for s in (0, 1)])
    assert f"| down | {mean:.3f} |" in table
    assert f"{expected.value:+.3f} [{expected.low:+.3f}, {expected.high:+.3f}] worse" in table
    assert "| sft |" in table and table.count("\n") == 4
