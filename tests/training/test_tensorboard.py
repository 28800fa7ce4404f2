"""TensorBoard event files carry the same scalars as metrics.jsonl (log.tensorboard: true)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import recipe

from lmdistill.training.config import validate
from lmdistill.training.loop import train


def test_tensorboard_events_match_metrics_jsonl(tmp_path: Path, student_dir: Path, sft_data: Path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    raw = recipe(tmp_path / "run", student_dir, sft_data, eval={"every": 2})
    raw["log"] = {"progress": False, "tensorboard": True}
    train(validate(raw, "tensorboard test"))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert {"loss", "lr", "eval/ce"} <= set(events.Tags()["scalars"])
    logged = {e.step: e.value for e in events.Scalars("loss")}
    assert logged.keys() == losses.keys()
    for step, value in losses.items():
        assert logged[step] == pytest.approx(value, rel=1e-6)


def test_tensorboard_asked_for_but_missing_is_said_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    import sys

    from lmdistill.training.loop import MetricsLog

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    log = MetricsLog(tmp_path, enabled=True, keep_until=0, tensorboard=True)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0 / step})
    log.close()
    lines = capsys.readouterr().err.splitlines()
    assert len([line for line in lines if "tensorboard package is not installed" in line]) == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3  # metrics still kept
    assert not (tmp_path / "tensorboard").exists()
