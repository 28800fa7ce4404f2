"""Two training processes follow the 1-process loss curve.

On a CPU-only machine the processes are started with `accelerate launch --multi_gpu` (torchrun
underneath; the loop then selects gloo on CPU). `accelerate launch --cpu --num_processes 2` is not
used: accelerate 1.x's CPU launcher starts a single process unless given an MPI hostfile, so it
would "match" trivially (this test checks the process count to rule that out)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import recipe


def curve(run_dir: Path) -> tuple[list[dict], dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["step"] > 0], records[0]["info"]


@pytest.mark.skipif(
    shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None,
    reason="no accelerate launcher",
)
@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(
    tmp_path: Path, student_dir: Path, teacher_dir: Path, sft_data: Path
):
    """Both runs use the same recipe: 2 micro-batches per step, which one process accumulates and
    two processes split. Online logit + hidden-state KD, so the teacher, the projections and the
    DDP gradient sum are all exercised."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores
    runs = {}
    for processes in (1, 2):
        raw = recipe(
            tmp_path / f"p{processes}",
            student_dir,
            sft_data,
            teacher={"model": str(teacher_dir)},
            objectives=[{"kind": "logits", "alpha": 0.5}, {"kind": "hidden", "weight": 0.5}],
            optim={"lr": 3e-3, "steps": 4},
            eval={"every": 2},
        )
        path = tmp_path / f"p{processes}.yaml"
        path.write_text(yaml.safe_dump(raw))
        launcher = [sys.executable, "-m", "lmdistill"]
        if processes == 2:
            accelerate = str(Path(sys.executable).parent / "accelerate")
            launcher = [
                accelerate,
                "launch",
                "--multi_gpu",
                "--num_processes",
                "2",
                "--num_machines",
                "1",
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
                "-m",
                "lmdistill",
            ]
        proc = subprocess.run(
            [*launcher, "train", str(path)], capture_output=True, text=True, env=env, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[processes] = curve(tmp_path / f"p{processes}")
    (one, info1), (two, info2) = runs[1], runs[2]
    assert info1["processes"] == 1 and info2["processes"] == 2
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "eval/kl", "eval/ce", "tokens", "loss_tokens"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
