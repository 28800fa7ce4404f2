"""Fixtures for training tests: a tiny trained teacher, its sampled responses as
SFT data, and a recipe builder. All offline; the session fixtures take about two seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

PROMPTS = [
    "What is 2 + 3?",
    "The capital of France",
    "explain photosynthesis",
    "Hello world!",
    "How are you today?",
    "What is 7 * 6?",
    "A teacher model",
    "0 1 2 3 4",
    "The capital of Japan",
    "distills knowledge",
    "in one sentence, please",
    "What is 100?",
]


# The tiny tokenizer's corpus, one sentence per response.
SENTENCES = [
    "The capital of France is Paris.",
    "The capital of Japan is Tokyo.",
    "What is 2 + 3? The answer is 5.",
    "What is 7 * 6? The answer is 42.",
    "A teacher model distills knowledge into a smaller student model.",
    "Explain photosynthesis in one sentence, please.",
    "Hello world! How are you today?",
]


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer, 48-wide tiny Llama trained (SFT, ~1 s) to answer with the corpus sentences.

    A randomly initialised teacher would not do: its predictions are near-uniform (every student
    looks equally close), and its samples re-tokenize differently from how they were sampled, so
    SFT on them would not move a student toward it. A trained teacher's samples are corpus-like
    text whose tokens are the teacher's own."""
    from tiny import save_tiny_model_dir

    from lmdistill.training.config import validate
    from lmdistill.training.loop import train

    root = tmp_path_factory.mktemp("teacher")
    save_tiny_model_dir(root / "init", layers=4, hidden=48, heads=4, seed=1)
    records = [
        {"messages": [{"role": "user", "content": p}], "response": s}
        for p in PROMPTS
        for s in SENTENCES
    ]
    data = write_jsonl(root / "corpus.jsonl", records)
    raw = recipe(
        root / "run", root / "init", data, optim={"lr": 1e-2, "steps": 60, "warmup_steps": 5}
    )
    raw["data"]["eval_fraction"] = 0.0
    return train(validate(raw, "teacher recipe")).final_dir


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide tiny Llama (random init) with the teacher's tokenizer."""
    from tiny import save_tiny_model_dir

    return save_tiny_model_dir(tmp_path_factory.mktemp("student"), layers=2, hidden=32, seed=2)


def sample_responses(
    model_dir: Path, prompts: list[str], *, repeats: int, max_new_tokens: int, seed: int = 0
) -> list[dict]:
    """Records like `lmdistill generate` writes: messages + the teacher's sampled response."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(seed)
    records = []
    for r in range(repeats):
        for i, prompt in enumerate(prompts):
            messages = [{"role": "user", "content": prompt}]
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                out = model.generate(
                    ids,
                    do_sample=True,
                    top_k=0,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                )
            response = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            records.append(
                {"id": f"{i}-{r}", "messages": messages, "response": response, "split": "train"}
            )
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def sft_data(tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path) -> Path:
    """48 conversations whose responses the teacher sampled (24 tokens at most)."""
    path = tmp_path_factory.mktemp("data") / "responses.jsonl"
    return write_jsonl(path, sample_responses(teacher_dir, PROMPTS, repeats=4, max_new_tokens=24))


def recipe(run_dir: Path, student_path: Path, data_path: Path, **sections) -> dict:
    """A small recipe dict: no progress bar, float32, cosine schedule; `sections` override."""
    raw = {
        "run_dir": str(run_dir),
        "seed": 0,
        "precision": "no",
        "student": {"model": str(student_path)},
        "data": {"path": str(data_path), "max_length": 64, "eval_fraction": 0.25},
        "batch": {"tokens_per_micro_batch": 256, "micro_batches_per_step": 2},
        "objectives": [{"kind": "sft"}],
        "optim": {"lr": 3e-3, "steps": 6, "warmup_steps": 1},
        "log": {"progress": False, "tensorboard": False},
    }
    raw.update(sections)
    return raw
