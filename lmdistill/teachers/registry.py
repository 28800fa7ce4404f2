"""Turn a teacher spec string (what a user types after --teacher or --model) into a Teacher.

smollm2-135m-instruct          a bundled model (converted once into the cache, then local)
./path/to/model-dir            a Hugging Face model dir (config.json, weights, tokenizer)
ORG/NAME[@REVISION]            a Hugging Face Hub model (downloaded, or from the HF cache offline)
openai:gpt-4o-mini             an OpenAI model (key from $OPENAI_API_KEY)
vllm:MODEL                     vLLM in-process, MODEL being any of the local forms above (GPU; pip install -e ".[vllm]")
http://127.0.0.1:8000/v1       any OpenAI-compatible server, e.g. `lmdistill serve`"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lmdistill.errors import UserError, did_you_mean
from lmdistill.models import hub_name, model_config_file, resolve_model_dir
from lmdistill.teachers.base import Capability, Teacher
from lmdistill.teachers.bundled import BUNDLED_NAMES


def load_teacher(spec: str, **options: Any) -> Teacher:
    """The teacher named by `spec`. `options` go to the teacher's constructor (`batch_size`,
    `device`, `dtype` for a local model; `concurrency`, `max_retries`, `timeout_s`, `api_key_env`
    for an API); an option the teacher does not take is a UserError. For a URL, `model=` picks the
    served model; without it the server's only model is used."""
    if spec.startswith("vllm:"):
        from lmdistill.teachers.vllm_teacher import VLLMTeacher, import_vllm

        import_vllm()  # a clear error before any path resolution on machines without vLLM
        target = spec.removeprefix("vllm:")
        # Resolved here rather than by vLLM, so that a revision is pinned and the offline cache
        # is read the same way for every teacher.
        return _construct(VLLMTeacher, spec, _model_dir(target), name=_name(target), **options)
    if spec.startswith("openai:"):
        model = spec.removeprefix("openai:")
        if not model:
            raise UserError("teacher 'openai:' needs a model name, e.g. openai:gpt-4o-mini")
        base_url = options.pop("base_url", None)  # None: OPENAI_BASE_URL or the OpenAI API
        return _construct(_openai_teacher_class(), spec, model, base_url=base_url, **options)
    if spec.startswith(("http://", "https://")):
        model = options.pop("model", None) or _only_served_model(spec, options)
        return _construct(_openai_teacher_class(), spec, model, base_url=spec, **options)
    from lmdistill.teachers.local import HFTeacher

    return _construct(HFTeacher, spec, _model_dir(spec), name=_name(spec), **options)


def check_teacher(spec: str, **options: Any) -> Capability:
    """What the teacher named by `spec` can give, found as `load_teacher` finds it but without
    loading weights or calling a server, so a recipe is checked before hours of work: a bundled
    name whose package is installed, a model dir with a config.json, a Hub model whose
    config.json is cached or downloadable (its weights are not fetched), vLLM installed, an API
    model with its key set (the same constructor runs; it makes no request), or a well-formed
    URL. `options` are checked against the teacher's constructor. Raises UserError."""
    if spec.startswith("vllm:"):
        from lmdistill.teachers.vllm_teacher import VLLMTeacher, import_vllm

        import_vllm()
        _check_model(spec.removeprefix("vllm:"))
        _check_options(VLLMTeacher, spec, options)
        return VLLMTeacher.capabilities
    if spec.startswith(("http://", "https://")):
        _check_url(spec)
        # Which model the server serves is asked only when the teacher loads (a network call);
        # any name builds the same client settings here.
        options = {"model": "served-model", **options}
    if is_api_spec(spec):
        return load_teacher(spec, **options).capabilities
    from lmdistill.teachers.local import HFTeacher

    _check_model(spec)
    _check_options(HFTeacher, spec, options)
    return HFTeacher.capabilities


def _model_dir(spec: str) -> Path:
    """The local model dir `spec` names (a bundled model converted, a dir, a Hub model's
    snapshot), or a UserError saying what else it could be."""
    _refuse_unknown(spec)
    return resolve_model_dir(spec)


def _name(spec: str) -> str | None:
    """The teacher's name: a bundled or Hub name as typed (a Hub snapshot's dir is named by its
    commit); None lets a model dir be named by its dir name."""
    return spec if spec in BUNDLED_NAMES or hub_name(spec) else None


def _check_model(spec: str) -> None:
    """`_model_dir`'s checks without converting, downloading or loading weights."""
    from lmdistill.teachers.bundled import gguf_path

    if spec in BUNDLED_NAMES:
        gguf_path(spec)  # the package holding its weights is installed
        return
    _refuse_unknown(spec)
    model_config_file(spec)


def _refuse_unknown(spec: str) -> None:
    """A bare word that is no bundled name and no existing dir is most likely a mistyped name."""
    if spec in BUNDLED_NAMES or hub_name(spec) or "/" in spec or Path(spec).expanduser().exists():
        return
    raise UserError(
        f"unknown teacher '{spec}'{did_you_mean(spec, BUNDLED_NAMES)}: use a bundled name "
        f"({', '.join(BUNDLED_NAMES)}), a Hugging Face model dir, a Hub name ORG/NAME[@REVISION], "
        "openai:MODEL, or an http(s):// URL of an OpenAI-compatible server"
    )


def _check_url(spec: str) -> None:
    """A server URL must name a host (and a numeric port, if any) to be reachable at all."""
    try:
        parts = urlsplit(spec)
        parts.port  # noqa: B018 - parsing the port raises ValueError when it is not a number
    except ValueError:
        parts = None
    if parts is None or not parts.hostname:
        raise UserError(
            f"teacher '{spec}': not a well-formed URL (expected e.g. http://127.0.0.1:8000/v1)"
        )


def is_api_spec(spec: str) -> bool:
    """Whether `spec` names a remote OpenAI-compatible API rather than a local model."""
    return spec.startswith(("openai:", "http://", "https://"))


def _check_options(cls: Callable[..., Teacher], spec: str, options: dict[str, Any]) -> None:
    """A UserError for an option the teacher class does not take."""
    accepted = set(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - accepted)
    if unknown:
        takes = ", ".join(sorted(accepted - {"self"})) or "none"
        raise UserError(
            f"teacher '{spec}' does not take option(s) {', '.join(unknown)} (it takes: {takes})"
        )


def _construct(cls: Callable[..., Teacher], spec: str, *args: Any, **options: Any) -> Teacher:
    """`cls(*args, **options)`, turning an option the class does not take into a UserError."""
    _check_options(cls, spec, options)
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
