"""Model specs: the one place a model name a user typed becomes a local model dir.

A spec is one of
  smollm2-135m-instruct      a bundled model (converted once into lmdistill's cache)
  ./path/to/model-dir        a Hugging Face model dir (config.json, weights, tokenizer)
  ORG/NAME[@REVISION]        a model on the Hugging Face Hub, as transformers, TRL and vLLM take it

A Hub name is resolved by `huggingface_hub`: downloaded into the HF cache when online, read from
that cache when offline (`HF_HUB_OFFLINE=1`, or when the Hub cannot be reached). `@REVISION` (a
branch, tag or commit) pins the revision; without it the cache's `main` is used. An existing local
path always wins over a Hub name of the same spelling (`models/student` is a dir when it exists).
Teachers, students, `eval --model` and `serve --model` all resolve through here. A model whose
tokenizer has no chat template gets a plain one (`ensure_chat_template`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmdistill.errors import UserError

# The Hub's repo id rules: ORG/NAME of letters, digits, '-', '_', '.'; '@' never occurs in one,
# so it can separate a revision (which may itself contain '/', e.g. refs/pr/1).
_HUB_NAME = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


@dataclass(frozen=True)
class HubName:
    """A parsed `ORG/NAME[@REVISION]`."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


def hub_name(spec: str | Path) -> HubName | None:
    """The Hub name `spec` spells, or None: a local path (existing, or starting with '/', '.',
    '~') and a bundled name are never Hub names."""
    text = str(spec)
    if text.startswith(("/", ".", "~")) or Path(text).expanduser().exists():
        return None
    match = _HUB_NAME.match(text)
    if match is None or match["repo"].endswith((".", "-")) or ".." in match["repo"]:
        return None
    return HubName(match["repo"], match["revision"])


def hub_offline() -> bool:
    """Whether Hub look-ups are off. Read from the environment at each call as well as from
    huggingface_hub's constants (which it reads once at import), so a caller that sets
    HF_HUB_OFFLINE after import is obeyed too."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(constants.HF_HUB_OFFLINE) or any(
        f.upper() in {"1", "ON", "YES", "TRUE"} for f in flags
    )


def resolve_model_dir(spec: str | Path) -> Path:
    """The local model dir `spec` names: a bundled model's converted dir (converting it on first
    use), the dir itself, or a Hub model's snapshot in the HF cache (downloading it when online).
    A UserError, one line, when it is none of these."""
    from lmdistill.teachers.bundled import BUNDLED_NAMES, bundled_model_dir

    if str(spec) in BUNDLED_NAMES:
        return bundled_model_dir(str(spec))
    name = hub_name(spec)
    if name is not None:
        return hub_snapshot(name)
    return local_model_dir(spec)


def model_config_file(spec: str | Path) -> Path:
    """`spec`'s config.json without loading (or, for a Hub model, downloading) its weights: what
    a recipe check reads. Bundled models have none until converted (see `bundled_config`)."""
    name = hub_name(spec)
    if name is None:
        return local_model_dir(spec) / "config.json"
    return _hub_call(name, lambda hub, **kw: hub.hf_hub_download(filename="config.json", **kw))


def local_model_dir(spec: str | Path) -> Path:
    """`spec` as an existing HF model dir, or a UserError saying what is missing."""
    path = Path(spec).expanduser()
    if (path / "config.json").is_file():
        return path
    if path.exists():
        raise UserError(f"{path} is not a Hugging Face model dir (no config.json)")
    raise UserError(
        f"model '{spec}': no such model dir (a Hub model is named ORG/NAME[@REVISION], "
        "e.g. Qwen/Qwen2.5-0.5B-Instruct)"
    )


def hub_snapshot(name: HubName) -> Path:
    """The HF cache's snapshot dir of `name`: downloaded when online, else read from the cache."""
    return _hub_call(name, lambda hub, **kw: hub.snapshot_download(**kw))


def cached_hub_snapshot(name: HubName) -> Path | None:
    """`name`'s snapshot dir when it is in the HF cache already, else None (never downloads)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(name.repo_id, revision=name.revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return path if (path / "config.json").is_file() else None


def _hub_call(name: HubName, call: Callable[..., str]) -> Path:
    """`call(huggingface_hub, repo_id=, revision=, local_files_only=)` for `name`, turning what it raises into one line:
    huggingface_hub falls back to the cache by itself when the Hub is unreachable, so a failure
    here means the model is neither reachable nor cached."""
    import huggingface_hub as hub
    from huggingface_hub import errors

    offline = hub_offline()
    try:
        path = Path(
            call(hub, repo_id=name.repo_id, revision=name.revision, local_files_only=offline)
        )
    except errors.RevisionNotFoundError:
        raise UserError(
            f"model '{name}': the Hub has no revision '{name.revision}' of {name.repo_id}"
        ) from None
    except errors.GatedRepoError:
        raise UserError(
            f"model '{name}' is gated: accept its terms on the Hub and log in (hf auth login)"
        ) from None
    except errors.RepositoryNotFoundError:
        raise UserError(
            f"model '{name}': no such model on the Hugging Face Hub (or it is private: "
            "log in with hf auth login)"
        ) from None
    except errors.LocalEntryNotFoundError:
        from huggingface_hub import constants

        why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub could not be reached"
        raise UserError(
            f"model '{name}' is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
            f"{why}; download it where the Hub is reachable (hf download {name.repo_id}"
            f"{f' --revision {name.revision}' if name.revision else ''}) or name a local model dir"
        ) from None
    except (errors.HfHubHTTPError, OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"model '{name}': could not get it from the Hub ({first})") from None
    if path.is_dir() and not (path / "config.json").is_file():
        raise UserError(f"model '{name}': its snapshot ({path}) has no config.json (not a model?)")
    return path


# For teachers whose tokenizer has no chat template (base models such as Gemma 3 270M): a plain
# "User: ... / Assistant: ..." transcript, opened with the BOS token (Gemma needs it; the text is
# tokenized with add_special_tokens=False everywhere in lmdistill) and closing each assistant turn
# with EOS. The generation prompt is "Assistant:", and the response follows after one space, so a
# prompt rendered for generation is a prefix of the rendered conversation (what the loss masks need).
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token or '' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + (eos_token or '') + '\n\n' }}"
    "{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\n\n' }}"
    "{% else %}"
    "{{ message['role'] | capitalize + ': ' + message['content'] + '\n\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def ensure_chat_template(tokenizer) -> bool:
    """Give `tokenizer` the plain template when it has none. True when it was added."""
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    return True
