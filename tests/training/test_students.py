"""Students built from the teacher's layers (lmdistill.training.students)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmdistill.errors import UserError
from lmdistill.training.students import (
    LoraSettings,
    apply_lora,
    model_shape,
    non_embedding_parameters,
    save_student,
    source_layers,
    spread_layers,
    student_from_teacher,
    student_problems,
)

IDS = torch.tensor([[3, 17, 40, 41, 99, 7, 12]])


def logits(model_dir: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(IDS).logits


def test_spread_layers_keeps_first_last_and_evenly_between():
    assert spread_layers(30, 4) == [0, 10, 19, 29]
    assert spread_layers(30, 2) == [0, 29]
    assert spread_layers(4, 4) == [0, 1, 2, 3]
    assert spread_layers(30, 1) == [29]
    with pytest.raises(UserError, match=r"1\.\.30 layers"):
        spread_layers(30, 31)


def test_a_student_with_every_layer_is_the_teacher(teacher_dir: Path, tmp_path: Path):
    info = student_from_teacher(teacher_dir, layers=4, out_dir=tmp_path / "s")
    torch.testing.assert_close(logits(tmp_path / "s"), logits(teacher_dir), atol=0, rtol=0)
    assert info.non_embedding_parameters == info.teacher_non_embedding_parameters


def test_chosen_layers_are_copied_into_place(teacher_dir: Path, tmp_path: Path):
    info = student_from_teacher(teacher_dir, layers=[0, 3], out_dir=tmp_path / "s")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).state_dict()
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s").state_dict()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "s").config.num_hidden_layers == 2
    for key, value in student.items():
        source = key.replace("layers.1.", "layers.3.")
        torch.testing.assert_close(value, teacher[source], atol=0, rtol=0)
    assert source_layers(tmp_path / "s") == [0, 3] == info.layers
    # Half the layers: half the non-embedding parameters, up to the final norm.
    assert info.non_embedding_parameters == (info.teacher_non_embedding_parameters - 48) // 2 + 48


def test_the_output_dir_is_a_complete_hf_model_dir(teacher_dir: Path, tmp_path: Path):
    student_from_teacher(teacher_dir, layers=2, out_dir=tmp_path / "s")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "s")
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(teacher_dir).chat_template
    assert (tmp_path / "s" / "generation_config.json").is_file()
    assert (tmp_path / "s" / "model.safetensors").is_file()


def test_narrowing_keeps_the_most_important_neurons_and_channels(teacher_dir: Path, tmp_path: Path):
    info = student_from_teacher(
        teacher_dir, layers=2, intermediate_size=40, hidden_size=32, out_dir=tmp_path / "s"
    )
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    assert student.config.hidden_size == 32 and student.config.intermediate_size == 40
    assert student.config.head_dim == teacher.config.head_dim  # heads keep their size
    channels = torch.tensor(info.channels)
    torch.testing.assert_close(
        student.get_input_embeddings().weight, teacher.get_input_embeddings().weight[:, channels]
    )
    norms = teacher.get_input_embeddings().weight.norm(dim=0)
    assert norms[channels].min() >= norms.sort().values[-32]  # the 32 largest
    assert torch.isfinite(student(IDS).logits).all()


def test_non_embedding_parameters_exclude_embedding_and_head_once(teacher_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    total = sum(p.numel() for p in model.parameters())
    assert non_embedding_parameters(model) == total - model.get_input_embeddings().weight.numel()


def test_bad_layer_lists_are_user_errors(teacher_dir: Path, tmp_path: Path):
    with pytest.raises(UserError, match=r"teacher layer indices in \[0, 4\)"):
        student_from_teacher(teacher_dir, layers=[0, 4], out_dir=tmp_path / "s")
    with pytest.raises(UserError, match="repeat"):
        student_from_teacher(teacher_dir, layers=[1, 1], out_dir=tmp_path / "s")
    with pytest.raises(UserError, match="multiple of the 4 attention heads"):
        student_from_teacher(teacher_dir, layers=2, hidden_size=30, out_dir=tmp_path / "s")


def test_a_saved_student_generates_with_its_kv_cache(student_dir: Path, tmp_path: Path):
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    model.config.use_cache = False  # as training sets it
    save_student(model, AutoTokenizer.from_pretrained(student_dir), tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["use_cache"] is True
    assert model.config.use_cache is False  # the training model is left as it was


def test_a_lora_student_saves_merged_as_a_plain_model_dir(student_dir: Path, tmp_path: Path):
    pytest.importorskip("peft")
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    lora = apply_lora(model, LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj")))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # move the adapters off their zero init so merging changes the weights
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        expected = lora(IDS).logits
    save_student(lora, AutoTokenizer.from_pretrained(student_dir), tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    torch.testing.assert_close(logits(tmp_path / "merged"), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"layers": 3},
        {"layers": [0, 0]},
        {"layers": [0, 5]},
        {"layers": 1, "hidden_size": 30},
        {"layers": 1, "intermediate_size": 100},
    ],
    ids=["too-many", "repeated", "out-of-range", "heads", "wider"],
)
def test_student_problems_finds_from_the_config_what_student_from_teacher_refuses(
    tiny_model_dir: Path, tmp_path: Path, kwargs
):
    """The recipe check (`student_problems`, config only) and the build agree, word for word."""
    problems = student_problems(model_shape(tiny_model_dir), **kwargs)
    assert len(problems) == 1
    with pytest.raises(UserError) as refused:
        student_from_teacher(tiny_model_dir, out_dir=tmp_path / "student", **kwargs)
    assert str(refused.value) == next(iter(problems.values()))


def test_student_problems_accepts_what_student_from_teacher_builds(
    tiny_model_dir: Path, tmp_path: Path
):
    kwargs = {"layers": [1], "hidden_size": 16, "intermediate_size": 32}
    assert student_problems(model_shape(tiny_model_dir), **kwargs) == {}
    info = student_from_teacher(tiny_model_dir, out_dir=tmp_path / "student", **kwargs)
    assert (info.layers, info.hidden_size, info.intermediate_size) == ([1], 16, 32)
