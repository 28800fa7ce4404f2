"""The quickstart's stages wired end to end on tiny models: every stage runs once, the report has
every model, and a rerun skips every stage and gives the same scores."""

import json

from lmdistill.pipelines.quickstart import QuickstartSettings, quickstart


def test_quickstart_end_to_end_on_tiny_models_then_skips_everything(
    tmp_path, tiny_model_dir, capsys
):
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": f"What is {i} + {i}?", "split": "test" if i % 4 == 0 else "train"}
        for i in range(16)
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    everyday = {}
    for split in ("train", "test"):
        everyday[split] = tmp_path / f"everyday_{split}.jsonl"
        asks = [f"How do I {verb} a {thing}?" for verb in ("fold", "draw") for thing in "ab"]
        everyday[split].write_text(
            "".join(json.dumps({"prompt": f"{a} ({split})", "split": split}) + "\n" for a in asks)
        )
    settings = QuickstartSettings(
        out_dir=tmp_path / "qs",
        teacher=str(tiny_model_dir),
        student_layers=1,
        student_intermediate=32,
        kd_top_k=8,  # KD from the offline cache
        max_tokens=4,
        epochs=1.0,
        eval_tasks=("arithmetic_1digit",),
        eval_limit=4,
        prompts=prompts,
        everyday_train=everyday["train"],
        everyday_train_limit=3,
        everyday_test=everyday["test"],
        everyday_test_limit=3,
        measure_cost=False,
        progress=False,
    )
    first = quickstart(settings)
    report = first.report_dir
    assert {r["stage"]: r["status"] for r in first.stages}["kd"] == "ran"
    data = json.loads((report / "report.json").read_text())
    rel = next(name for name in data["tasks"] if name.endswith("held_out.jsonl"))
    daily = next(name for name in data["tasks"] if name.endswith("held_out_everyday.jsonl"))
    assert set(data["tasks"]) == {rel, daily, "arithmetic_1digit"}
    assert data["tasks"][rel]["n"] == 4  # the bundled held-out split only
    assert data["tasks"][daily]["n"] == 3  # the first 3 everyday held-out requests
    responses = (tmp_path / "qs" / "data" / "teacher_responses.jsonl").read_text()
    trained = [json.loads(line) for line in responses.splitlines()]
    everyday_train = [r for r in trained if r.get("set") == "everyday" and r["split"] == "train"]
    assert len(everyday_train) == 3  # added to the training data
    assert json.loads((report / "report.json").read_text())["training_prompts"]["prompts"] == 15
    models = json.loads((report / "report.json").read_text())["models"]
    assert {"teacher", "student", "sft-only", "untrained"} <= set(models)
    for kind in ("sft", "kd"):
        assert (tmp_path / "qs" / "runs" / kind / "final" / "config.json").exists()
    # The KD student against SFT-only and untrained: paired differences on every metric.
    compared = {(c["against"], c["metric"]) for c in data["comparisons"]}
    for other in ("sft-only", "untrained"):
        assert {(other, m) for m in ("rouge_l", "kl", "top1_agreement", "accuracy")} <= compared
    err = capsys.readouterr().err
    assert "held-out" in err and "everyday held-out" in err  # the verdict lines

    again = quickstart(settings)
    status = {r["stage"]: r["status"] for r in again.stages}
    assert {r["stage"]: r["status"] for r in first.stages}["cache"] == "ran"
    for stage in ("responses", "student", "cache", "sft", "kd"):
        assert status[stage] == "skipped (done)"
    # Evaluation reruns, answered from its cache: the same scores.
    rerun = json.loads((again.report_dir / "report.json").read_text())["tasks"]
    roles = ("teacher", "student", "sft-only", "untrained")
    for name, task in data["tasks"].items():
        assert [rerun[name][r] for r in roles] == [task[r] for r in roles]


def test_quickstart_refuses_a_dir_made_with_other_settings(tmp_path):
    import pytest

    from lmdistill.errors import UserError
    from lmdistill.pipelines.quickstart import check_settings

    path = tmp_path / "settings.json"
    check_settings(QuickstartSettings(), path)  # a new dir: nothing to compare
    path.write_text(
        json.dumps({**json.loads(json.dumps(QuickstartSettings().__dict__, default=str))})
    )
    check_settings(QuickstartSettings(progress=False, eval_limit=10), path)  # display only
    with pytest.raises(UserError, match=r"seed, student_layers differ"):
        check_settings(QuickstartSettings(student_layers=5, seed=1), path)


def test_quickstart_refuses_a_student_the_teacher_cannot_give_before_any_stage(
    tmp_path, tiny_model_dir
):
    import pytest

    from lmdistill.errors import UserError

    out = tmp_path / "qs"
    settings = QuickstartSettings(out_dir=out, teacher=str(tiny_model_dir), student_layers=99)
    with pytest.raises(UserError, match=r"--layers: .*needs 1"):
        quickstart(settings)
    assert not out.exists()


def test_a_run_that_fails_side_by_side_is_named_with_its_last_line(tmp_path, tiny_model_dir):
    import pytest

    from lmdistill.errors import UserError
    from lmdistill.pipelines.quickstart import StageLog, train_config, train_side_by_side

    s = QuickstartSettings(out_dir=tmp_path, teacher=str(tiny_model_dir), progress=False)
    missing = tmp_path / "no-such-data.jsonl"
    configs = {"sft": train_config(s, tmp_path / "runs" / "sft", tiny_model_dir, missing, "sft")}
    log = StageLog()
    with pytest.raises(UserError, match=r"training sft failed: .*no-such-data\.jsonl"):
        train_side_by_side(configs, log, progress=False)
    assert log.rows == [{"stage": "sft", "status": "failed", "seconds": log.rows[0]["seconds"]}]
    assert (tmp_path / "runs" / "sft.log").is_file()
