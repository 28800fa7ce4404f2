"""The training recipe: a typed config, loaded from YAML with `key=value` overrides, validated on load.

An unknown key or a value of the wrong type is a `UserError` naming the file and the dotted key,
e.g. `recipes/sft.yaml: optim.lrr: unknown key`. The resolved config (defaults filled in, overrides
applied) is what a run saves next to its checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lmdistill.errors import UserError
from lmdistill.losses.divergences import Divergence


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FromTeacher(_Strict):
    """Build the student from the teacher's layers (see `training.students.student_from_teacher`)."""

    teacher: str = Field(description="bundled teacher name or HF model dir")
    layers: int | list[int] = Field(description="teacher layers to keep, or how many (spread)")
    intermediate_size: int | None = None
    hidden_size: int | None = None


class Lora(_Strict):
    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"


class Student(_Strict):
    model: str | None = Field(None, description="an HF causal LM dir")
    from_teacher: FromTeacher | None = None
    lora: Lora | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Student:
        if (self.model is None) == (self.from_teacher is None):
            raise ValueError("give exactly one of student.model and student.from_teacher")
        return self


class Teacher(_Strict):
    model: str | None = Field(None, description="teacher spec: bundled name or HF model dir")
    cache: str | None = Field(None, description="offline top-k cache dir (lmdistill cache-logits)")
    dtype: Literal["float32", "bfloat16", "float16"] | None = None


class Data(_Strict):
    path: str
    split: str | None = Field(None, description="keep only records whose 'split' field equals this")
    max_length: int = Field(1024, ge=2, description="tokens per example; longer ones are cut")
    eval_path: str | None = None
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="held out when eval_path is unset")


class Batch(_Strict):
    tokens_per_micro_batch: int = Field(4096, ge=2, description="padded tokens per forward")
    micro_batches_per_step: int = Field(1, ge=1, description="global, over all processes")
    packing: bool = True


class SftObjective(_Strict):
    """Cross-entropy on the assistant tokens (response distillation when the data are teacher
    responses)."""

    kind: Literal["sft"]
    weight: float = Field(1.0, gt=0)


class LogitsObjective(_Strict):
    """KD on the teacher's distribution: online (teacher.model) or from teacher.cache."""

    kind: Literal["logits"]
    weight: float = Field(1.0, gt=0)
    divergence: Divergence = "forward_kl"
    temperature: float = Field(1.0, gt=0)
    alpha: float = Field(1.0, ge=0, le=1, description="weight of the soft term; CE gets 1 - alpha")
    beta: float = Field(0.5, gt=0, lt=1)
    skew: float = Field(0.1, ge=0, lt=1)
    source: Literal["auto", "online", "cache"] = "auto"


class HiddenObjective(_Strict):
    """Hidden-state KD through learned projections on mapped layer pairs."""

    kind: Literal["hidden"]
    weight: float = Field(1.0, gt=0)
    loss: Literal["mse", "cosine"] = "mse"
    layer_map: dict[int, int] | None = Field(
        None,
        description="student layer -> teacher layer; default: the student's source layers "
        "or round(i * (L_t - 1) / (L_s - 1))",
    )


Objective = Annotated[SftObjective | LogitsObjective | HiddenObjective, Field(discriminator="kind")]
OBJECTIVE_KINDS = ("sft", "logits", "hidden")


class Optim(_Strict):
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    steps: int | None = Field(None, ge=1, description="optimizer steps; default: epochs of data")
    epochs: float = Field(1.0, gt=0)


class Eval(_Strict):
    every: int = Field(0, ge=0, description="steps between evaluations; 0: only at the end")
    max_batches: int | None = Field(None, ge=1)


class Checkpoint(_Strict):
    every: int = Field(0, ge=0, description="steps between checkpoints; 0: none")
    keep: int = Field(2, ge=1, description="newest checkpoints kept")


class Log(_Strict):
    progress: bool = True
    tensorboard: bool = True


class TrainConfig(_Strict):
    run_dir: str
    seed: int = 0
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    student: Student
    teacher: Teacher = Teacher()
    data: Data
    batch: Batch = Batch()
    objectives: list[Objective] = Field(min_length=1)
    optim: Optim = Optim()
    eval: Eval = Eval()
    checkpoint: Checkpoint = Checkpoint()
    log: Log = Log()

    @model_validator(mode="after")
    def _teacher_for_objectives(self) -> TrainConfig:
        for i, objective in enumerate(self.objectives):
            if isinstance(objective, LogitsObjective):
                source = logits_source(objective, self.teacher)
                if source == "cache" and self.teacher.cache is None:
                    raise ValueError(f"objectives.{i}: source 'cache' needs teacher.cache")
                if source == "online" and self.teacher.model is None:
                    raise ValueError(
                        f"objectives.{i}: logit KD needs teacher.model or teacher.cache"
                    )
                if source == "cache" and objective.divergence == "reverse_kl":
                    raise ValueError(
                        f"objectives.{i}: reverse_kl is infinite against a top-k cache"
                    )
            if isinstance(objective, HiddenObjective) and self.teacher.model is None:
                raise ValueError(
                    f"objectives.{i}: hidden-state KD needs teacher.model (a cache has no hidden states)"
                )
        kinds = [o.kind for o in self.objectives]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"objectives: each kind at most once, got {kinds}")
        return self


def logits_source(objective: LogitsObjective, teacher: Teacher) -> str:
    """'cache' or 'online': auto prefers the cache (no teacher forward) when both are given."""
    if objective.source != "auto":
        return objective.source
    return "cache" if teacher.cache is not None else "online"


# ------------------------------------------------------------------------------------- loading
def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML recipe, apply `key=value` overrides (dotted paths, list items by index, values
    parsed as YAML), and validate. Errors name the file and the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such recipe") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise UserError(f"{path}{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a YAML mapping of settings")
    for item in overrides:
        apply_override(raw, item)
    return validate(raw, str(path))


def validate(raw: dict[str, Any], source: str) -> TrainConfig:
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"{source}: {describe(exc)}") from None


def describe(exc: ValidationError) -> str:
    """pydantic's errors as one line: `key.path: message (got VALUE)`; joined by '; '."""
    parts = []
    for error in exc.errors():
        loc = [str(p) for p in error["loc"]]
        # A discriminated union adds the tag to the path (objectives.0.logits.temperature).
        loc = [
            p
            for i, p in enumerate(loc)
            if not (p in OBJECTIVE_KINDS and i and loc[i - 1].isdigit())
        ]
        key = ".".join(loc) or "recipe"
        if error["type"] == "extra_forbidden":
            parts.append(f"{key}: unknown key")
        elif error["type"] == "missing":
            parts.append(f"{key}: required")
        else:
            message = error["msg"].removeprefix("Value error, ")
            got = error.get("input")
            shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
            parts.append(f"{key}: {message}{shown}")
    return "; ".join(parts)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.0.c=value` in the nested dict `raw` (creating mappings as needed)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise UserError(f"override '{item}': expected key=value (e.g. optim.lr=3e-4)")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise UserError(f"override '{item}': the value is not valid YAML") from None
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        node = _child(node, part, key, parts[: depth + 1])
    last = parts[-1]
    if isinstance(node, list):
        node[_index(node, last, key)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise UserError(f"override '{key}': {'.'.join(parts[:-1])} is not a mapping")


def _child(node: Any, part: str, key: str, path: list[str]) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, key)]
    if not isinstance(node, dict):
        raise UserError(f"override '{key}': {'.'.join(path[:-1])} is not a mapping")
    if node.get(part) is None:
        node[part] = {}
    return node[part]


def _index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise UserError(f"override '{key}': '{part}' is not an index of a {len(node)}-item list")
    return int(part)


def dump(config: TrainConfig) -> str:
    """The resolved config as YAML (what a run saves as config.yaml)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
