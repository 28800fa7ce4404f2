"""The training loop on tiny models: losses fall, distillation gets closer to the teacher, resume
continues the same curve bitwise, runs leave a complete, loadable run dir."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import recipe

from lmdistill.errors import UserError
from lmdistill.training.config import validate
from lmdistill.training.evaluate import evaluate
from lmdistill.training.loop import LrSchedule, Trainer, train
from lmdistill.training.objectives import default_layer_map
from lmdistill.training.students import load_model_dir, student_from_teacher


def config(tmp_path: Path, name: str, student_path: Path, data: Path, **sections):
    return validate(recipe(tmp_path / name, student_path, data, **sections), name)


def test_sft_loss_falls(tmp_path: Path, student_dir: Path, sft_data: Path):
    result = train(
        config(
            tmp_path,
            "sft",
            student_dir,
            sft_data,
            optim={"lr": 1e-2, "steps": 12, "warmup_steps": 1},
        )
    )
    losses = [r["loss"] for r in result.history]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0]


def test_logit_kd_beats_sft_which_beats_no_training(
    tmp_path: Path, student_dir: Path, teacher_dir: Path, sft_data: Path
):
    """After the same steps on the same data, the KD student's held-out KL to the teacher is the
    lowest and its top-1 agreement the highest; the SFT student is between it and the untrained."""
    teacher = {"model": str(teacher_dir)}
    optim = {"lr": 1e-2, "steps": 30, "warmup_steps": 2}
    sft = train(config(tmp_path, "sft", student_dir, sft_data, teacher=teacher, optim=optim))
    kd = config(
        tmp_path,
        "kd",
        student_dir,
        sft_data,
        teacher=teacher,
        optim=optim,
        objectives=[{"kind": "logits", "temperature": 1.0, "alpha": 1.0}],
    )
    trainer = Trainer(kd)  # also gives the held-out batches and the online teacher to judge with
    trainer.run()
    batches = trainer.eval_batches()
    scores = {
        name: evaluate(load_model_dir(path)[0], batches, trainer.teacher)
        for name, path in [
            ("untrained", student_dir),
            ("sft", sft.final_dir),
            ("kd", tmp_path / "kd" / "final"),
        ]
    }
    assert scores["kd"]["kl"] < scores["sft"]["kl"] < scores["untrained"]["kl"]
    assert scores["kd"]["top1"] > scores["sft"]["top1"] > scores["untrained"]["top1"]


class Crash(Exception):
    pass


def test_resume_continues_the_same_loss_curve_bitwise(
    tmp_path: Path, student_dir: Path, teacher_dir: Path, sft_data: Path, monkeypatch
):
    sections = dict(
        teacher={"model": str(teacher_dir)},
        objectives=[
            {"kind": "logits", "alpha": 0.5, "temperature": 2.0},
            {"kind": "hidden", "weight": 0.5},
        ],
        optim={"lr": 3e-3, "steps": 8, "warmup_steps": 2},
        checkpoint={"every": 3, "keep": 1},
        eval={"every": 4},
    )
    full = train(config(tmp_path, "run", student_dir, sft_data, **sections))

    crashed = config(tmp_path, "crashed", student_dir, sft_data, **sections)
    original = Trainer.train_step

    def crash_at_step_5(self, batches):
        if self.step == 4:
            raise Crash
        return original(self, batches)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_5)
    with pytest.raises(Crash):
        train(crashed)
    monkeypatch.setattr(Trainer, "train_step", original)
    resumed = train(crashed, resume=True)

    assert [r["step"] for r in resumed.history] == [4, 5, 6, 7, 8]  # from the step-3 checkpoint
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history[3:]]
    a, _ = load_model_dir(full.final_dir)
    b, _ = load_model_dir(resumed.final_dir)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    metrics = [
        json.loads(line)
        for line in (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 9))  # one curve, no repeats
    assert len(list((tmp_path / "crashed" / "checkpoints").iterdir())) == 1  # keep: 1


def test_resume_refuses_a_changed_recipe_and_a_fresh_start_refuses_an_old_run(
    tmp_path: Path, student_dir: Path, sft_data: Path
):
    sections = dict(optim={"lr": 1e-2, "steps": 2}, checkpoint={"every": 1})
    train(config(tmp_path, "run", student_dir, sft_data, **sections))
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        train(config(tmp_path, "run", student_dir, sft_data, **sections))
    changed = dict(optim={"lr": 1e-3, "steps": 2}, checkpoint={"every": 1})
    with pytest.raises(UserError, match=r"recipe differs .*\(optim.lr\)"):
        train(config(tmp_path, "run", student_dir, sft_data, **changed), resume=True)


def test_a_run_dir_holds_config_metrics_and_a_loadable_student(
    tmp_path: Path, student_dir: Path, sft_data: Path
):
    cfg = config(
        tmp_path, "run", student_dir, sft_data, optim={"lr": 1e-2, "steps": 3}, eval={"every": 2}
    )
    result = train(cfg)
    run = tmp_path / "run"
    assert validate(__import__("yaml").safe_load((run / "config.yaml").read_text()), "saved") == cfg
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["tokens_per_s"] > 0 and r["loss_tokens"] <= r["tokens"] for r in steps)
    assert [r["step"] for r in records if "eval/ce" in r] == [2, 3]
    model, tokenizer = load_model_dir(result.final_dir)
    assert tokenizer.chat_template and model.config.num_hidden_layers == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["eval"]["ce"] == result.eval["ce"]


def test_hidden_loss_starts_at_zero_for_a_student_copied_from_the_teacher(
    tmp_path: Path, teacher_dir: Path, sft_data: Path
):
    """Identity projections and the default map (each student layer to the teacher layer it was
    copied from) make the first step's hidden-state loss exactly zero."""
    student = tmp_path / "copy"
    student_from_teacher(teacher_dir, layers=[0, 1, 2, 3], out_dir=student)
    cfg = config(
        tmp_path,
        "run",
        student,
        sft_data,
        teacher={"model": str(teacher_dir)},
        objectives=[{"kind": "logits"}, {"kind": "hidden"}],
        optim={"lr": 1e-3, "steps": 2},
    )
    result = train(cfg)
    assert result.history[0]["loss/hidden"] == 0.0
    assert result.history[0]["loss/logits"] < 1e-6  # the student is the teacher


def test_default_layer_map():
    assert default_layer_map(4, 30) == {0: 0, 1: 10, 2: 19, 3: 29}
    assert default_layer_map(2, 4) == {0: 0, 1: 3}
    assert default_layer_map(1, 4) == {0: 3}
    assert default_layer_map(2, 4, source=[1, 2]) == {0: 1, 1: 2}  # the layers it was copied from
    assert default_layer_map(2, 4, source=[1, 2, 3]) == {0: 0, 1: 3}  # not this student's


def test_bad_layer_map_is_a_user_error(
    tmp_path: Path, student_dir: Path, teacher_dir: Path, sft_data: Path
):
    cfg = config(
        tmp_path,
        "run",
        student_dir,
        sft_data,
        teacher={"model": str(teacher_dir)},
        objectives=[{"kind": "hidden", "layer_map": {0: 0, 2: 3}}],
    )
    with pytest.raises(UserError, match="layer_map key 2 is not a student layer"):
        train(cfg)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cosine = LrSchedule("cosine", warmup=4, total=14, min_ratio=0.1)
    assert [cosine(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine(9) == pytest.approx(0.55)  # halfway through the decay
    assert cosine(14) == pytest.approx(0.1) and cosine(20) == pytest.approx(0.1)
    linear = LrSchedule("linear", warmup=0, total=10, min_ratio=0.0)
    assert linear(5) == pytest.approx(0.5)


def test_a_lora_run_trains_only_adapters_and_saves_a_merged_model(
    tmp_path: Path, student_dir: Path, sft_data: Path
):
    pytest.importorskip("peft")
    lora = {
        "model": str(student_dir),
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    }
    result = train(
        config(
            tmp_path, "lora", student_dir, sft_data, student=lora, optim={"lr": 1e-2, "steps": 3}
        )
    )
    assert not (result.final_dir / "adapter_config.json").exists()
    base, _ = load_model_dir(student_dir)
    merged, _ = load_model_dir(result.final_dir)
    changed = {
        n for n, p in merged.state_dict().items() if not torch.equal(p, base.state_dict()[n])
    }
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in changed)


def test_liger_kernels_for_the_student_are_refused_off_cuda_in_one_line(
    tmp_path: Path, student_dir: Path, sft_data: Path
):
    """Liger's Triton kernels run on CUDA only: on this CPU machine the option is a clear
    UserError before any step, not a Triton traceback mid-run."""
    from lmdistill.errors import UserError
    from lmdistill.training.loop import Trainer

    raw = recipe(tmp_path / "liger", student_dir, sft_data)
    raw["student"]["liger"] = True
    with pytest.raises(UserError, match=r"student\.liger: .*CUDA"):
        Trainer(validate(raw, "liger"))
