"""bench/gpu_check.sh (issue 13, item 7) on this CPU machine: without CUDA it skips what needs it
and still prints its JSON line; with --smoke it runs both parts at a tiny size on the CPU (the
fused loss, one real KD training step with the teacher online). What it measures on a GPU (bf16,
Liger at 8192 x 128256, the 0.5B/1.5B step) runs only on a GPU machine."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
from needs import needs_smollm2

SCRIPT = Path(__file__).parents[1] / "bench" / "gpu_check.sh"
PYTHON = Path(__file__).parents[1] / ".venv" / "bin" / "python"


def run(*args: str) -> dict:
    env = {**os.environ, "PYTHON": str(PYTHON) if PYTHON.exists() else "python"}
    out = subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU skip mode")
def test_without_cuda_it_skips_each_part_and_prints_its_json_line():
    result = run()
    assert result["device"] == "cpu" and not result["smoke"]
    assert result["loss"] == {"skipped": "needs CUDA"} == result["kd_step"]


@pytest.mark.slow
@needs_smollm2
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke mode")
def test_smoke_mode_runs_the_loss_and_a_kd_step_on_cpu(real_cache):
    result = run("--smoke")
    assert result["smoke"]
    assert math.isfinite(result["loss"]["fused"]["value"])
    step = result["kd_step"]
    assert step["tokens_per_s"] > 0 and step["teacher_params"] > step["student_params"]
    assert step["attention"] == "sdpa"  # what transformers picks where torch has it
