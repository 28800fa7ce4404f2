"""The training recipe: a typed config, loaded from YAML with `key=value` overrides, validated on load.

An unknown key or a value of the wrong type is a `UserError` naming the file and the dotted key,
e.g. `recipes/sft.yaml: optim.lrr: unknown key`. The resolved config (defaults filled in, overrides
applied) is what a run saves next to its checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from lmdistill.data.records import Fields
from lmdistill.errors import RecipeError, UserError
from lmdistill.losses.divergences import Divergence


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FromTeacher(_Strict):
    """Build the student from the teacher's layers (see `training.students.student_from_teacher`)."""

    teacher: str = Field(description="bundled teacher name, HF model dir or Hub name")
    layers: int | list[int] = Field(
        description="teacher layers to keep, or how many (chosen by `selection`)"
    )
    intermediate_size: int | None = None
    hidden_size: int | None = None
    selection: Literal["spread", "importance"] = Field(
        "spread",
        description="with a layer count: 'spread' evenly, or 'importance' (Minitron-style: "
        "iterative removal of the layers whose loss raises the KL to the teacher least, and MLP "
        "neurons ranked by activation, on `calibration` conversations of the training data)",
    )
    calibration: int = Field(
        8, ge=1, description="importance: how many of data.path's first examples it reads"
    )
    calibration_tokens: int = Field(64, ge=8, description="importance: tokens read of each")


class Lora(_Strict):
    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"


class Student(_Strict):
    model: str | None = Field(None, description="an HF causal LM dir or Hub name ORG/NAME[@REV]")
    from_teacher: FromTeacher | None = None
    lora: Lora | None = None
    liger: bool = Field(
        False,
        description="swap the student's RMSNorm, RoPE and SwiGLU for Liger-Kernel's Triton "
        "kernels (CUDA only; the LM head and loss are lmdistill's fused loss either way)",
    )

    @model_validator(mode="after")
    def _one_source(self) -> Student:
        if (self.model is None) == (self.from_teacher is None):
            raise ValueError("give exactly one of student.model and student.from_teacher")
        return self


class Teacher(_Strict):
    model: str | None = Field(
        None, description="teacher spec: bundled name, HF model dir or Hub name"
    )
    cache: str | None = Field(None, description="offline top-k cache dir (lmdistill cache-logits)")
    dtype: Literal["float32", "bfloat16", "float16"] | None = None


class SpanWeights(_Strict):
    """Loss weights of a response's reasoning and final-answer tokens. The final answer starts at
    the record's `answer_start` (a character offset in `response`, as the reasoning filter writes
    it); records without one are all reasoning. Each loss token's sft/logits loss is multiplied by
    its weight, and the loss still divides by the count of loss tokens (the one reduction rule),
    so weights change a token's share, not the normalisation."""

    reasoning: float = Field(1.0, ge=0)
    answer: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _not_all_zero(self) -> SpanWeights:
        if self.reasoning == 0 and self.answer == 0:
            raise ValueError("reasoning and answer weights are both 0: nothing would be trained")
        return self


class Data(_Strict):
    path: str = Field(
        description="JSONL, Parquet or CSV file, a datasets save_to_disk dir, or hf:NAME[:CONFIG][@SPLIT]"
    )
    fields: Fields = Field(
        None, description="field mapping: alpaca, dolly, sharegpt or KEY=COLUMN,..."
    )
    split: str | None = Field(None, description="keep only records whose 'split' field equals this")
    max_length: int = Field(1024, ge=2, description="tokens per example; longer ones are cut")
    eval_path: str | None = None
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="held out when eval_path is unset")
    span_weights: SpanWeights | None = Field(
        None, description="loss weights of reasoning vs final-answer tokens; None: all 1"
    )


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


class UldObjective(_Strict):
    """Universal Logit Distillation (Boizard et al. 2024) from a teacher with ANOTHER tokenizer: the
    teacher reads its own tokenization of each example; response positions are paired by index.
    See `lmdistill.losses.uld` and `lmdistill.data.cross_tokenizer` for the formula and limits."""

    kind: Literal["uld"]
    weight: float = Field(1.0, gt=0)
    temperature: float = Field(1.0, gt=0)
    alpha: float = Field(
        0.5,
        ge=0,
        le=1,
        description="weight of the ULD term; cross-entropy on the student's tokens gets 1 - alpha",
    )
    top_k: int | None = Field(
        4096,
        ge=1,
        description="sorted probabilities kept per side (plus a tail-mass term); null: exact",
    )


Objective = Annotated[
    SftObjective | LogitsObjective | HiddenObjective | UldObjective, Field(discriminator="kind")
]
OBJECTIVE_KINDS = ("sft", "logits", "hidden", "uld")


class PolicyServer(_Strict):
    """Sample the student through an OpenAI-compatible server instead of in-process generate:
    `lmdistill serve --model STUDENT_INIT --allow-weight-reload`, or any server that answers
    /v1/completions with token ids for token-id prompts (`return_token_ids`, vLLM >= 0.10.2)
    and accepts POST /reload_weights {"path": FILE.safetensors}. Before an on-policy step whose
    server weights are `sync_every` or more steps old, the trainer's main process writes the
    student's weights to RUN_DIR/policy/weights.safetensors and asks the server to load them;
    the server must be able to read that path (the same machine or a shared filesystem)."""

    url: str = Field(description="the server's base URL, e.g. http://127.0.0.1:8000/v1")
    model: str | None = Field(None, description="the served model's id; default: the first listed")
    api_key_env: str | None = Field(
        None,
        description="environment variable holding the server's API key (the key itself never "
        "goes in a recipe); none: no key",
    )
    sync_every: int = Field(
        1,
        ge=1,
        description="on-policy steps a pushed copy of the weights serves before the next push "
        "(1: every step samples from the current student; more: cheaper, slightly stale)",
    )
    timeout_s: float = Field(600.0, gt=0, description="per request")


class OnPolicy(_Strict):
    """On-policy distillation (GKD: Agarwal et al. 2024, arXiv:2306.13649). On a fraction `lambda`
    of the steps the student samples responses to the step's prompts and the teacher scores the
    student's tokens; the other steps train on the data. On a sampled step the logits objective's
    soft term gets weight 1 (its alpha is ignored there: cross-entropy on the student's own samples
    would only reinforce them; GKD uses the divergence alone)."""

    model_config = ConfigDict(extra="forbid", frozen=True, serialize_by_alias=True)

    lambda_: float = Field(
        0.5,
        ge=0,
        le=1,
        alias="lambda",
        description="probability that a step trains on student samples (a pure function of "
        "seed and step, so resumed and multi-process runs pick the same steps)",
    )
    temperature: float = Field(1.0, gt=0, description="the student's sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling; 1: the full distribution")
    max_new_tokens: int = Field(128, ge=1, description="sampled tokens per prompt at most")
    proposal: Literal["student", "speculative"] = Field(
        "student",
        description="who writes the samples: 'student' (GKD: the student alone) or "
        "'speculative' (SKD, Xu et al. 2024, arXiv:2410.11325: the student proposes each token "
        "and a token outside the teacher's top `teacher_top_k` is replaced by the teacher's "
        "sample; needs a local teacher with the student's vocabulary)",
    )
    teacher_top_k: int = Field(
        25,
        ge=1,
        description="speculative proposal: a student token is kept when it is among "
        "this many of the teacher's most likely next tokens",
    )
    replay: int = Field(
        0,
        ge=0,
        description="DistiLLM's off-policy replay (Ko et al. 2024, arXiv:2402.03898): a buffer of "
        "up to this many sampled examples; once it is full, an on-policy step samples fresh (and "
        "stores what it sampled) with a probability that falls to 0 over the run, and otherwise "
        "trains on examples drawn from the buffer. 0: every on-policy step samples fresh",
    )
    adaptive: bool = Field(
        False,
        description="DistiLLM's adaptive schedule: `lambda` is only the starting probability of "
        "an on-policy step; it rises by 0.1 (to at most 1) at each held-out evaluation whose "
        "loss is at least `adaptive_margin` above the loss of the last rise (or of step 0). "
        "Needs eval.every and held-out data",
    )
    adaptive_margin: float = Field(0.1, ge=0, description="see `adaptive`")
    server: PolicyServer | None = Field(
        None, description="sample through an OpenAI-compatible server (see PolicyServer)"
    )
    drop_unfinished: bool = Field(
        False,
        description="a sample with no end-of-turn token within `max_new_tokens` (or the row "
        "length) gets no loss targets (DAPO's overlong filtering, Yu et al. 2025, "
        "arXiv:2503.14476). A weak student's unfinished samples are mostly loops, and a small "
        "teacher scoring a loop predicts that it goes on, so training on them teaches looping. "
        "A step whose samples all are unfinished makes no update",
    )


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
    on_policy: OnPolicy | None = None

    @field_validator("precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `no` as false (`precision: no` in a recipe, `train.precision=no`
        # on the command line): it means the documented value, not a boolean.
        return "no" if value is False else value

    @model_validator(mode="after")
    def _on_policy_needs_an_online_teacher(self) -> TrainConfig:
        if self.on_policy is None:
            return self
        if self.teacher.model is None:
            raise ValueError(
                "on_policy: needs teacher.model (the teacher scores the student's samples online; "
                "a cache only has the data's tokens)"
            )
        kinds = [o.kind for o in self.objectives]
        logits = [o for o in self.objectives if isinstance(o, LogitsObjective)]
        if not logits or logits_source(logits[0], self.teacher) != "online":
            raise ValueError(
                "on_policy: needs a logits objective with the online teacher (source 'online', "
                "or 'auto' without teacher.cache)"
            )
        if not set(kinds) <= {"logits", "hidden"}:
            raise ValueError(
                f"on_policy: objectives {kinds}: only logits and hidden can train on student "
                "samples (for cross-entropy on the data, use the logits objective's alpha < 1)"
            )
        server = self.on_policy.server
        if server is not None and self.on_policy.proposal == "speculative":
            raise ValueError(
                "on_policy.server: a speculative proposal samples with the local teacher "
                "token by token; sample in-process (drop server) or use proposal 'student'"
            )
        if server is not None and self.student.lora is not None:
            raise ValueError(
                "on_policy.server: a LoRA student's weights do not load into the served model; "
                "train the full student or sample in-process"
            )
        held_out = self.data.eval_path is not None or self.data.eval_fraction > 0
        if self.on_policy.adaptive and not (self.eval.every and held_out):
            raise ValueError(
                "on_policy.adaptive: needs eval.every > 0 and held-out data (data.eval_path or "
                "data.eval_fraction > 0): the schedule follows the held-out loss"
            )
        return self

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
            if isinstance(objective, UldObjective):
                _check_uld_teacher(i, self.teacher)
        kinds = [o.kind for o in self.objectives]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"objectives: each kind at most once, got {kinds}")
        if "uld" in kinds and {"logits", "hidden"} & set(kinds):
            raise ValueError(
                "objectives: uld (teacher with its own tokenizer) cannot be combined with logits "
                "or hidden, which need the student's vocabulary and tokenization"
            )
        return self


def _check_uld_teacher(i: int, teacher: Teacher) -> None:
    if teacher.cache is not None:
        raise ValueError(
            f"objectives.{i}: uld cannot use teacher.cache: an offline cache holds the teacher's "
            "top-k on the STUDENT's tokens, while ULD runs the teacher on its own tokenization of "
            "each example; remove teacher.cache and give teacher.model"
        )
    if teacher.model is None:
        raise ValueError(f"objectives.{i}: uld needs teacher.model (a local model with logits)")


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
    raw = read_yaml_mapping(path)
    for item in overrides:
        apply_override(raw, item)
    return validate(raw, str(path))


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A recipe file's YAML mapping; a missing file or bad YAML is a UserError naming file:line."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such recipe") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise UserError(f"{path}{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a YAML mapping of settings")
    return raw


def validate(raw: dict[str, Any], source: str, *, key_prefix: str = "") -> TrainConfig:
    """`raw` as a TrainConfig; a RecipeError with every schema problem, one per line, each key
    prefixed with `key_prefix` (`train.` for a run recipe's train section)."""
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(source, describe_lines(exc, key_prefix)) from None


def describe(exc: ValidationError) -> str:
    """pydantic's errors as one line: `key.path: message (got VALUE)`; joined by '; '."""
    return "; ".join(describe_lines(exc))


def describe_lines(exc: ValidationError, key_prefix: str = "") -> list[str]:
    """pydantic's errors, one `key.path: message (got VALUE)` each."""
    parts = []
    for error in exc.errors():
        loc = [str(p) for p in error["loc"]]
        # A discriminated union adds the tag to the path (objectives.0.logits.temperature).
        loc = [
            p
            for i, p in enumerate(loc)
            if not (p in OBJECTIVE_KINDS and i and loc[i - 1].isdigit())
        ]
        key = key_prefix + ".".join(loc)
        if error["type"] == "extra_forbidden":
            parts.append(f"{key}: unknown key")
        elif error["type"] == "missing":
            parts.append(f"{key}: required")
        else:
            message = error["msg"].removeprefix("Value error, ")
            got = error.get("input")
            shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
            # A whole-recipe check names its own keys at the start of its message.
            parts.append(f"{key}: {message}{shown}" if loc else f"{key_prefix}{message}{shown}")
    return parts


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


def describe_plan(config: TrainConfig) -> str:
    """One paragraph saying what `train(config)` would do, from the config alone (no model or data
    is read): the `lmdistill train --dry-run` plan."""
    student = config.student
    if student.from_teacher is not None:
        source = (
            f"built from teacher '{student.from_teacher.teacher}' "
            f"(layers: {student.from_teacher.layers})"
        )
    else:
        source = f"loaded from '{student.model}'"
    if student.lora is not None:
        source += f", trained through LoRA adapters (r={student.lora.r})"
    teacher = config.teacher
    teachers = [f"online teacher '{teacher.model}'"] if teacher.model else []
    teachers += [f"top-k cache '{teacher.cache}'"] if teacher.cache else []
    objectives = ", ".join(
        f"{o.kind} ({', '.join(f'{k}={v}' for k, v in settings.items())})"
        for o in config.objectives
        for settings in [o.model_dump(exclude={"kind"}, exclude_none=True)]
    )
    optim, batch = config.optim, config.batch
    steps = (
        f"{optim.steps} optimizer steps"
        if optim.steps is not None
        else f"{optim.epochs:g} epochs of the data (the step count is known once it is tokenized)"
    )
    parts = [
        f"Plan: train the student {source}, "
        f"with {' and '.join(teachers) or 'no teacher'}, on '{config.data.path}'",
        f"objectives: {objectives}",
        f"{steps}; a step is {batch.micro_batches_per_step} micro-batch(es) of at most "
        f"{batch.tokens_per_micro_batch} padded tokens; lr {optim.lr:g} ({optim.schedule})",
    ]
    if config.data.span_weights is not None:
        w = config.data.span_weights
        parts.append(f"loss weights: reasoning {w.reasoning:g}, final answer {w.answer:g}")
    if config.on_policy is not None:
        op = config.on_policy
        parts.append(
            f"on-policy on a fraction {op.lambda_:g} of the steps (the student samples up to "
            f"{op.max_new_tokens} tokens per prompt at temperature {op.temperature:g}, "
            f"top_p {op.top_p:g}; the teacher scores them)"
            + (" rising with the held-out loss (adaptive)" if op.adaptive else "")
            + (f"; a replay buffer of {op.replay} samples" if op.replay else "")
            + (f"; sampled through {op.server.url}" if op.server else "")
        )
    parts.append(f"outputs in '{config.run_dir}'. Nothing was loaded or run.")
    return "; ".join(parts)
