"""Turn a teacher spec string (what a user types after --teacher or --model) into a Teacher.

smollm2-135m-instruct          a bundled model (converted once into the cache, then local)
./path/to/model-dir            a Hugging Face model dir (config.json, weights, tokenizer)
openai:gpt-4o-mini             an OpenAI model (key from $OPENAI_API_KEY)
vllm:MODEL_DIR_OR_NAME         vLLM in-process (GPU; pip install -e ".[vllm]")
http://127.0.0.1:8000/v1       any OpenAI-compatible server, e.g. `lmdistill serve`"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmdistill.errors import UserError
from lmdistill.teachers.base import Teacher
from lmdistill.teachers.bundled import BUNDLED_NAMES


def load_teacher(spec: str, **options: Any) -> Teacher:
    """The teacher named by `spec`. `options` go to the teacher's constructor (`batch_size`,
    `device`, `dtype` for a local model; `concurrency`, `max_retries`, `timeout_s`, `api_key_env`
    for an API); an option the teacher does not take is a UserError. For a URL, `model=` picks the
    served model; without it the server's only model is used."""
    if spec in BUNDLED_NAMES:
        from lmdistill.teachers.bundled import bundled_model_dir
        from lmdistill.teachers.local import HFTeacher

        return _construct(HFTeacher, spec, bundled_model_dir(spec), name=spec, **options)
    if spec.startswith("vllm:"):
        from lmdistill.teachers.vllm_teacher import VLLMTeacher, import_vllm

        import_vllm()  # a clear error before any path resolution on machines without vLLM
        target = spec.removeprefix("vllm:")
        if target in BUNDLED_NAMES:
            from lmdistill.teachers.bundled import bundled_model_dir

            return _construct(VLLMTeacher, spec, bundled_model_dir(target), name=target, **options)
        return _construct(VLLMTeacher, spec, Path(target).expanduser(), **options)
    if spec.startswith("openai:"):
        model = spec.removeprefix("openai:")
        if not model:
            raise UserError("teacher 'openai:' needs a model name, e.g. openai:gpt-4o-mini")
        base_url = options.pop("base_url", None)  # None: OPENAI_BASE_URL or the OpenAI API
        return _construct(_openai_teacher_class(), spec, model, base_url=base_url, **options)
    if spec.startswith(("http://", "https://")):
        model = options.pop("model", None) or _only_served_model(spec, options)
        return _construct(_openai_teacher_class(), spec, model, base_url=spec, **options)
    path = Path(spec).expanduser()
    if (path / "config.json").is_file():
        from lmdistill.teachers.local import HFTeacher

        return _construct(HFTeacher, spec, path, **options)
    if path.exists():
        raise UserError(
            f"teacher '{spec}': {path} is not a Hugging Face model dir (no config.json)"
        )
    raise UserError(
        f"unknown teacher '{spec}': use a bundled name ({', '.join(BUNDLED_NAMES)}), "
        "a Hugging Face model dir, openai:MODEL, or an http(s):// URL of an OpenAI-compatible server"
    )


def is_api_spec(spec: str) -> bool:
    """Whether `spec` names a remote OpenAI-compatible API rather than a local model."""
    return spec.startswith(("openai:", "http://", "https://"))


def _construct(cls: Callable[..., Teacher], spec: str, *args: Any, **options: Any) -> Teacher:
    """`cls(*args, **options)`, turning an option the class does not take into a UserError."""
    accepted = set(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - accepted)
    if unknown:
        takes = ", ".join(sorted(accepted - {"self"})) or "none"
        raise UserError(
            f"teacher '{spec}' does not take option(s) {', '.join(unknown)} (it takes: {takes})"
        )
    return cls(*args, **options)


def _openai_teacher_class() -> Callable[..., Teacher]:
    try:
        from lmdistill.teachers.openai_api import OpenAITeacher
    except ImportError as exc:
        raise UserError(f"API teachers are unavailable in this install: {exc}") from None
    return OpenAITeacher


def _only_served_model(base_url: str, options: dict[str, Any]) -> str:
    """The id of the one model an OpenAI-compatible server lists (what `lmdistill serve` runs)."""
    import os

    import openai

    key = os.environ.get(options.get("api_key_env", "OPENAI_API_KEY")) or "none"
    client = openai.OpenAI(
        base_url=base_url, api_key=key, max_retries=0, timeout=options.get("timeout_s", 30.0)
    )
    try:
        ids = [model.id for model in client.models.list().data]
    except openai.APIConnectionError:
        raise UserError(f"could not reach the server at {base_url}: is it running?") from None
    except openai.AuthenticationError:
        raise UserError(
            f"{base_url} refused the API key (check ${options.get('api_key_env', 'OPENAI_API_KEY')})"
        ) from None
    except openai.APIError as exc:
        raise UserError(
            f"could not list the models at {base_url} ({type(exc).__name__}); name the model to use"
        ) from None
    finally:
        client.close()
    if len(ids) != 1:
        raise UserError(f"{base_url} serves {len(ids)} models ({', '.join(ids)}); name one")
    return ids[0]
