"""FSDP2 (through an accelerate config file) follows the 1-process loss curve and saves the same
student. Run on CPU with 2 gloo processes; the same config shape serves GPU clusters
(recipes/accelerate/fsdp.yaml)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import recipe

FSDP_CPU = {
    "compute_environment": "LOCAL_MACHINE",
    "distributed_type": "FSDP",
    "mixed_precision": "no",
    "num_machines": 1,
    "num_processes": 2,
    "machine_rank": 0,
    "rdzv_backend": "static",
    "same_network": True,
    "use_cpu": False,
    "fsdp_config": {
        "fsdp_version": 2,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "fsdp_reshard_after_forward": True,
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_cpu_ram_efficient_loading": False,
        "fsdp_offload_params": False,
    },
}


def _curve(run_dir: Path) -> tuple[list[dict], dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["step"] > 0], records[0]["info"]


@pytest.mark.skipif(
    shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None,
    reason="no accelerate launcher",
)
@pytest.mark.slow
def test_fsdp_two_processes_match_one(
    tmp_path: Path, student_dir: Path, teacher_dir: Path, sft_data: Path
):
    from transformers import AutoModelForCausalLM

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    config_file = tmp_path / "accelerate-fsdp.yaml"
    config_file.write_text(yaml.safe_dump(FSDP_CPU))
    runs = {}
    for name in ("one", "fsdp"):
        raw = recipe(
            tmp_path / name,
            student_dir,
            sft_data,
            teacher={"model": str(teacher_dir)},
            objectives=[{"kind": "logits", "alpha": 0.5}, {"kind": "hidden", "weight": 0.5}],
            optim={"lr": 3e-3, "steps": 3},
            eval={"every": 3},
        )
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        launcher = [sys.executable, "-m", "lmdistill"]
        if name == "fsdp":
            accelerate = str(Path(sys.executable).parent / "accelerate")
            launcher = [accelerate, "launch", "--config_file", str(config_file), "-m", "lmdistill"]
        proc = subprocess.run(
            [*launcher, "train", str(path)], capture_output=True, text=True, env=env, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = _curve(tmp_path / name)
    (one, info1), (fsdp, info2) = runs["one"], runs["fsdp"]
    assert info1["processes"] == 1 and info2["processes"] == 2
    assert [r["step"] for r in one] == [r["step"] for r in fsdp]
    for a, b in zip(one, fsdp, strict=True):
        for key in ("loss", "eval/kl", "eval/ce"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    # final/ is a full (gathered) HF model dir, equal to the 1-process student.
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "final")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "final")
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
