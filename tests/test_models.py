"""Model specs (lmdistill.models): Hub names resolve from a Hugging Face cache that each test lays
out itself (the public `models--ORG--NAME` layout), offline; nothing is downloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import save_hub_snapshot

from lmdistill.errors import UserError
from lmdistill.models import HubName, hub_name, model_config_file, resolve_model_dir

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


def test_hub_names_are_told_from_paths_and_bundled_names(tmp_path: Path, monkeypatch) -> None:
    assert hub_name("Qwen/Qwen2.5-0.5B-Instruct") == HubName("Qwen/Qwen2.5-0.5B-Instruct")
    assert hub_name("org/model@v1.0") == HubName("org/model", "v1.0")
    assert hub_name("org/model@refs/pr/3") == HubName("org/model", "refs/pr/3")
    for local in ("./org/model", "/abs/model", "~/model", "smollm2-135m-instruct", "a/b/c"):
        assert hub_name(local) is None, local
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "final").mkdir(parents=True)
    assert hub_name("runs/final") is None  # an existing dir wins over a Hub name


def test_a_cached_hub_model_resolves_offline_to_its_snapshot(
    tiny_model_dir: Path, hub_cache: Path
) -> None:
    snapshot = save_hub_snapshot(tiny_model_dir, hub_cache, "org/tiny", commit=COMMIT_A)
    assert resolve_model_dir("org/tiny") == snapshot
    assert model_config_file("org/tiny") == snapshot / "config.json"


def test_a_revision_is_pinned(tiny_model_dir: Path, hub_cache: Path) -> None:
    a = save_hub_snapshot(tiny_model_dir, hub_cache, "org/tiny", commit=COMMIT_A)
    b = save_hub_snapshot(tiny_model_dir, hub_cache, "org/tiny", commit=COMMIT_B)
    (hub_cache / "models--org--tiny" / "refs" / "main").write_text(COMMIT_A)
    (hub_cache / "models--org--tiny" / "refs" / "v2").write_text(COMMIT_B)
    assert resolve_model_dir("org/tiny") == a
    assert resolve_model_dir(f"org/tiny@{COMMIT_B}") == b
    assert resolve_model_dir("org/tiny@v2") == b
    with pytest.raises(UserError, match=r"'org/tiny@v3' is not in the Hugging Face cache"):
        resolve_model_dir("org/tiny@v3")


def test_an_uncached_name_offline_is_one_line_saying_how_to_get_it(hub_cache: Path) -> None:
    with pytest.raises(UserError) as error:
        resolve_model_dir("org/missing@v1")
    message = str(error.value)
    assert "\n" not in message
    assert "'org/missing@v1' is not in the Hugging Face cache" in message
    assert "HF_HUB_OFFLINE is set" in message and "hf download org/missing --revision v1" in message


def test_online_the_hub_is_asked_with_the_revision(
    tiny_model_dir: Path, hub_cache: Path, monkeypatch
) -> None:
    """Online, snapshot_download is called (it downloads, or falls back to the cache when the Hub
    is unreachable); faked here, since tests never reach the Hub."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    calls = []

    def fake_snapshot_download(**kwargs):
        calls.append(kwargs)
        return str(save_hub_snapshot(tiny_model_dir, hub_cache, kwargs["repo_id"]))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    resolve_model_dir("org/tiny@v1")
    assert calls == [{"repo_id": "org/tiny", "revision": "v1", "local_files_only": False}]

    def not_found(**kwargs):
        from types import SimpleNamespace

        from huggingface_hub.errors import RepositoryNotFoundError

        response = SimpleNamespace(headers={}, request=None, status_code=404)
        raise RepositoryNotFoundError("404 Client Error. Repository Not Found", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_found)
    with pytest.raises(
        UserError, match=r"^model 'org/nope': no such model on the Hugging Face Hub"
    ):
        resolve_model_dir("org/nope")


def test_a_hub_teacher_loads_and_is_named_by_its_hub_name(
    tiny_model_dir: Path, hub_cache: Path
) -> None:
    from lmdistill.teachers.base import Capability
    from lmdistill.teachers.registry import check_teacher, load_teacher

    save_hub_snapshot(tiny_model_dir, hub_cache, "org/tiny", commit=COMMIT_A)
    assert Capability.FULL_LOGITS in check_teacher("org/tiny")
    teacher = load_teacher(f"org/tiny@{COMMIT_A}", batch_size=2)
    assert teacher.name == f"org/tiny@{COMMIT_A}"
    with pytest.raises(UserError, match="not in the Hugging Face cache"):
        check_teacher("org/other")


def test_a_recipe_with_hub_models_checks_and_trains(tiny_model_dir: Path, hub_cache: Path) -> None:
    """Student and online teacher both named on the Hub: the recipe check reads their configs
    from the cache, and two KD steps train."""
    from lmdistill.training.config import validate
    from lmdistill.training.loop import train
    from lmdistill.training.students import model_shape

    save_hub_snapshot(tiny_model_dir, hub_cache, "org/tiny", commit=COMMIT_A)
    assert model_shape("org/tiny").num_hidden_layers == 2
    data = hub_cache.parent / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": f"What is {i} + 1?", "response": f"The answer is {i + 1}."})
            + "\n"
            for i in range(8)
        )
    )
    raw = {
        "run_dir": str(hub_cache.parent / "run"),
        "precision": "no",
        "student": {"model": "org/tiny"},
        "teacher": {"model": f"org/tiny@{COMMIT_A}"},
        "data": {"path": str(data), "max_length": 64, "eval_fraction": 0.0},
        "batch": {"tokens_per_micro_batch": 256, "micro_batches_per_step": 1},
        "objectives": [{"kind": "logits", "weight": 1.0}],
        "optim": {"lr": 1e-3, "steps": 2, "warmup_steps": 0},
        "log": {"progress": False, "tensorboard": False},
    }
    result = train(validate(raw, "hub recipe"))
    assert len(result.history) == 2 and (result.final_dir / "config.json").is_file()


def _cli(args: list[str], hub_cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lmdistill", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--teacher", "org/missing", "--prompts", "p.jsonl", "--out", "o.jsonl"],
        ["serve", "--model", "org/missing", "--port", "9"],
        ["eval", "--model", "org/missing", "--tasks", "arithmetic_1digit", "--out", "e"],
    ],
    ids=["generate", "serve", "eval"],
)
def test_cli_says_one_line_for_an_uncached_hub_name(
    args: list[str], hub_cache: Path, tmp_path: Path
) -> None:
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    args = [str(tmp_path / a) if a in {"p.jsonl", "o.jsonl", "e"} else a for a in args]
    done = _cli(args, hub_cache)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "'org/missing' is not in the Hugging Face cache" in lines[0]


def test_generate_with_a_hub_teacher_on_alpaca_parquet_prompts(
    tiny_model_dir: Path, hub_cache: Path, tmp_path: Path
) -> None:
    """A new user's first command: a Hub teacher, a Hub-style dataset file, no conversion."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    save_hub_snapshot(tiny_model_dir, hub_cache, "org/tiny", commit=COMMIT_A)
    rows = [{"instruction": "Say hi.", "input": "", "output": "Hi."}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "alpaca.parquet")
    out = tmp_path / "out.jsonl"
    args = ["generate", "--teacher", "org/tiny", "--prompts", str(tmp_path / "alpaca.parquet")]
    done = _cli([*args, "--fields", "alpaca", "--out", str(out), "--max-tokens", "3"], hub_cache)
    assert done.returncode == 0, done.stderr
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["teacher"] == "org/tiny"
    assert record["messages"] == [{"role": "user", "content": "Say hi."}]
