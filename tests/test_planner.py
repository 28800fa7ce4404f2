"""`lmdistill plan` (lmdistill.pipelines.planner): its memory estimate against the measured peak of real
training runs on this CPU machine, and its command line.

How the peak is measured: each run is a fresh Python process that imports everything, writes its
data and student, and reads its resident set size (RSS, /proc/self/statm) as the baseline; then
it builds lmdistill's real Trainer and runs two optimizer steps (the second runs with AdamW's
moments allocated, the steady state), and reads its peak RSS (VmHWM in /proc/self/status). The measured figure
is peak minus baseline: everything the run allocated (weights, gradients, optimizer state,
activations, the loss buffers, and whatever the allocators keep cached), nothing it did not.
The estimate is the planner's for one process in float32 with attention on the math path (CPU
with packed rows). Small models' memory is dominated by what the planner models only when
activations and parameters are large against the fixed costs (tokenizer, Accelerate, allocator
arenas: ~30-60 MB here), so the runs are sized at a few hundred MB."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUNS = [  # (hidden, intermediate, layers, heads, tokens per micro-batch)
    (256, 1024, 4, 4, 4096),
    (512, 1408, 3, 8, 2048),
]


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(spec: dict) -> dict:
    """One measured run (in a fresh process)."""
    import torch
    from tiny import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmdistill.pipelines.planner import shape_from_config, train_memory
    from lmdistill.training.config import TrainConfig
    from lmdistill.training.loop import Trainer

    torch.set_num_threads(1)
    work = Path(spec["work"])
    tokenizer = make_tokenizer()
    hidden, intermediate, layers, heads, tokens = spec["run"]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
    )
    LlamaForCausalLM(config).save_pretrained(work / "student")
    tokenizer.save_pretrained(work / "student")
    text = "The capital of France is Paris. What is 2 + 3? The answer is 5. " * 12
    with (work / "data.jsonl").open("w") as out:
        for i in range(64):
            out.write(json.dumps({"prompt": f"Question {i}: {text}", "response": text}) + "\n")
    train = TrainConfig.model_validate(
        {
            "run_dir": str(work / "run"),
            "student": {"model": str(work / "student")},
            "data": {"path": str(work / "data.jsonl"), "max_length": 512, "eval_fraction": 0},
            "batch": {"tokens_per_micro_batch": tokens},
            "objectives": [{"kind": "sft"}],
            "optim": {"steps": 2},
            "log": {"progress": False, "tensorboard": False},
        }
    )
    baseline = _rss_bytes()
    trainer = Trainer(train)
    real_tokens = 0
    for step in range(2):
        batches = trainer.step_batches(step)
        real_tokens = max(real_tokens, max(b.input_ids.numel() for b in batches))
        trainer.train_step(batches)
    # VmHWM, not ru_maxrss: Linux carries a parent's peak RSS across fork + exec into the child's
    # ru_maxrss, so under pytest (a large parent) it read the parent's peak.
    status = Path("/proc/self/status").read_text()
    peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
    estimate = train_memory(
        shape_from_config(config),
        None,
        strategy="ddp",
        place="online",
        gpus=1,
        tokens=real_tokens,
        row=512,
        compute_bytes=4,
        teacher_bytes=4,
        math_attention=True,
    )
    return {"measured": peak - baseline, "estimate": estimate.total, "tokens": real_tokens}


@pytest.mark.parametrize("run", RUNS)
def test_memory_estimates_are_within_25_percent_of_measured_peaks(tmp_path: Path, run):
    spec = json.dumps({"work": str(tmp_path), "run": list(run)})
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    out = subprocess.run(
        [sys.executable, __file__, spec], env=env, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = result["estimate"] / result["measured"]
    print(run, result, f"estimate / measured = {ratio:.3f}")
    assert 0.75 <= ratio <= 1.25, result


# ------------------------------------------------------------------------------ the command
def _write_train_recipe(tmp_path: Path, model_dir: Path, **extra) -> Path:
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": "Hi " * 10, "response": "Hello " * 30}) + "\n" for _ in range(40)
        )
    )
    recipe = {
        "run_dir": str(tmp_path / "run"),
        "student": {"model": str(model_dir)},
        "teacher": {"model": str(model_dir)},
        "data": {"path": str(data), "max_length": 256},
        "batch": {"tokens_per_micro_batch": 1024},
        "objectives": [{"kind": "logits"}],
        "optim": {"epochs": 2},
        **extra,
    }
    path = tmp_path / "train.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


def test_parameter_counts_come_from_the_config_alone(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    from lmdistill.pipelines.planner import model_config, shape_from_config

    real = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    shape = shape_from_config(model_config(str(tiny_model_dir)))
    assert shape.params == sum(p.numel() for p in real.parameters())
    assert shape.layers == real.config.num_hidden_layers


def test_plan_gives_each_strategy_its_memory_fit_tokens_and_hours(tmp_path, tiny_model_dir, capsys):
    from lmdistill.cli import main

    recipe = _write_train_recipe(tmp_path, tiny_model_dir)
    assert main(["plan", str(recipe), "--gpus", "2", "--gpu-memory", "80", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    (train,) = plan["stages"]
    rows = train["memory_per_gpu"]
    assert set(rows) == {
        f"{s}, teacher {p}" for s in ("ddp", "fsdp") for p in ("online", "cache", "server")
    }
    assert rows["ddp, teacher online"]["teacher"] > 0 == rows["ddp, teacher cache"]["teacher"]
    assert rows["fsdp, teacher cache"]["optimizer"] < rows["ddp, teacher cache"]["optimizer"]
    assert all(r["fits"] for r in rows.values())
    assert train["tokens"] > 0 and train["hours"] >= 0
    assert main(["plan", str(recipe), "--gpu-memory", "0.0001"]) == 0
    assert "NO" in capsys.readouterr().out  # does not fit


def test_plan_prices_an_api_teacher(tmp_path, tiny_model_dir, capsys):
    from lmdistill.cli import main
    from lmdistill.pipelines.planner import count_records

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}?"}) + "\n" for i in range(3)))
    recipe = tmp_path / "run.yaml"
    recipe.write_text(
        json.dumps(
            {
                "run_dir": str(tmp_path / "run"),
                "teacher": "openai:gpt-4o-mini",
                "prompts": {"path": str(prompts)},
                "generate": {"n": 2, "max_tokens": 10, "temperature": 0.7},
                "train": {
                    "student": {"model": str(tiny_model_dir)},
                    "objectives": [{"kind": "sft"}],
                },
            }
        )
    )
    args = ["plan", str(recipe), "--price-input", "2.5", "--price-output", "10", "--json"]
    assert main(args) == 0
    generate = json.loads(capsys.readouterr().out)["stages"][0]
    prompt_tokens = count_records(str(prompts))[1] // 4
    assert generate["spend_usd"] == round(3 * 2 * (prompt_tokens * 2.5 + 10 * 10) / 1e6, 2)
    assert generate["memory_per_gpu"] == {}  # an API teacher takes no GPU


def test_a_bad_recipe_is_one_line_naming_it(tmp_path, tiny_model_dir, capsys):
    from lmdistill.cli import main

    recipe = _write_train_recipe(tmp_path, tiny_model_dir, optimm={"lr": 1})
    assert main(["plan", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.yaml" in err[0] and "optimm" in err[0]


if __name__ == "__main__":
    print(json.dumps(child(json.loads(sys.argv[1]))))
