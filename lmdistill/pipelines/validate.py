"""Check a whole recipe before its first stage runs (issue 15): a typo in an eval task or a
student deeper than its teacher must not surface after hours of generation and training, or
after every API response has been paid for.

The checks are cheap (configs, GGUF headers, tokenizers, the first record of each file; no
weights, no network) and run the code the stages run later wherever it can be run cheaply:
`get_task` and `make_evaluator` for task specs, `check_teacher` (the resolution of
`load_teacher`) for model specs, `student_problems` (the rules of `student_from_teacher`) for
a student built from its teacher, the record parsers of `generate` and training for input files.
Every problem is collected, keyed by its recipe key, and raised together as one `RecipeError`:

    recipes/x.yaml: eval.tasks.1: unknown task 'arithmetc_1digit' (did you mean arithmetic_1digit?); ...
    recipes/x.yaml: train.student.from_teacher.layers: a student from a 30-layer teacher needs 1..30 layers, got 40

`lmdistill run`, `train` and `self-distill` call these before any stage (and with `--dry-run`).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from lmdistill.data.records import field_map
from lmdistill.errors import RecipeError, UserError
from lmdistill.teachers.base import Capability

if TYPE_CHECKING:
    from lmdistill.pipelines.run import RunRecipe
    from lmdistill.pipelines.self_distill import SelfDistillConfig
    from lmdistill.training.config import TrainConfig
    from lmdistill.training.students import ModelShape

T = TypeVar("T")


class _Checker:
    """The problems found so far ('key: message'), and each model spec resolved once."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self._teachers: dict[str, Capability | None] = {}
        self._shapes: dict[str, ModelShape | None] = {}

    def add(self, key: str, message: str) -> None:
        self.problems.append(f"{key}: {message}")

    def run(self, key: str, check: Callable[[], T]) -> T | None:
        """check(); a UserError it raises becomes a problem at `key`, and None is returned."""
        try:
            return check()
        except RecipeError as exc:  # already keyed (a section validated on its own)
            self.problems.extend(exc.problems)
        except UserError as exc:
            self.add(key, str(exc))
        return None

    def teacher(
        self, key: str, spec: str, options: dict[str, Any] | None = None
    ) -> Capability | None:
        """What the teacher `spec` can give, or None (reported at `key`, the first time only)."""
        from lmdistill.teachers.registry import check_teacher

        if spec not in self._teachers:
            self._teachers[spec] = self.run(key, lambda: check_teacher(spec, **(options or {})))
        return self._teachers[spec]

    def shape(self, key: str, spec: str) -> ModelShape | None:
        """The config-level shape of a local model, or None (reported at `key`, once)."""
        from lmdistill.training.students import model_shape

        if spec not in self._shapes:
            self._shapes[spec] = self.run(key, lambda: model_shape(spec))
        return self._shapes[spec]

    def raise_for(self, source: str) -> None:
        if self.problems:
            raise RecipeError(source, self.problems)


# ---------------------------------------------------------------------------------- run
def check_run_recipe(recipe: RunRecipe, source: str) -> None:
    """Every problem of a `lmdistill run` recipe, raised as one RecipeError (nothing run)."""
    checker = _Checker()
    _check_run(checker, recipe, source)
    checker.raise_for(source)


def _check_run(c: _Checker, recipe: RunRecipe, source: str) -> None:
    from lmdistill.pipelines.run import train_config

    caps = None
    if recipe.teacher is not None:
        caps = c.teacher("teacher", recipe.teacher, recipe.teacher_options)
    if recipe.cache_logits is not None and caps is not None and Capability.FULL_LOGITS not in caps:
        # build_cache scores the data's own tokens: an API's top-k of its own text cannot.
        c.add("cache_logits", _needs_logits(recipe.teacher, caps, "the top-k cache"))
    if recipe.synthesize is not None and caps is not None and Capability.CONTINUATION not in caps:
        from lmdistill.pipelines.synthesize import PURPOSE

        c.add("synthesize", f"teacher '{recipe.teacher}' cannot continue raw text ({PURPOSE})")
    for i, avoid in enumerate(recipe.synthesize.avoid if recipe.synthesize else []):
        from lmdistill.pipelines.generate import first_prompt

        c.run(f"synthesize.avoid.{i}", lambda avoid=avoid: first_prompt(avoid))
    _check_prompts(c, recipe)
    if recipe.filter is not None and recipe.filter.task is not None:
        _check_task(c, "filter.task", recipe.filter.task)
    fsdp = _check_launch(c, recipe)
    config = c.run("train", lambda: train_config(recipe, source))
    if config is not None:
        _check_train(
            c,
            config,
            prefix="train.",
            data_made=recipe.generate is not None,
            cache_made=recipe.cache_logits is not None,
            processes=recipe.launch.num_processes if recipe.launch else 1,
            fsdp=fsdp,
        )
    if recipe.eval is not None:
        _check_eval(c, recipe, caps)


def _check_prompts(c: _Checker, recipe: RunRecipe) -> None:
    p = recipe.prompts
    if p is None:
        return
    if p.path is not None:
        from lmdistill.pipelines.generate import first_prompt

        c.run("prompts.path", lambda: first_prompt(p.path, field_map(p.fields)))
    if p.task is not None:
        _check_task(c, "prompts.task", p.task)
    if p.template is not None:
        from lmdistill.skills.reasoning import template

        c.run("prompts.template", lambda: template(p.template))


def _check_task(c: _Checker, key: str, spec: str) -> None:
    from lmdistill.tasks.registry import get_task

    c.run(key, lambda: get_task(spec))


def _check_launch(c: _Checker, recipe: RunRecipe) -> bool:
    """Whether the train stage runs under FSDP (from launch.config_file)."""
    launch = recipe.launch
    if launch is None or launch.config_file is None:
        return False
    settings = c.run("launch.config_file", lambda: _accelerate_config(launch.config_file))
    kind = str((settings or {}).get("distributed_type", "")).upper()
    if kind == "DEEPSPEED":
        # The loop accumulates gradients itself; DeepSpeed's engine steps inside backward.
        c.add("launch.config_file", "DeepSpeed is not supported by the training loop; use FSDP")
    return kind == "FSDP"


def _accelerate_config(path: str) -> dict[str, Any]:
    from lmdistill.training.config import read_yaml_mapping

    if not Path(path).is_file():
        raise UserError(f"{path}: no such accelerate config file")
    return read_yaml_mapping(Path(path))


def _check_eval(c: _Checker, recipe: RunRecipe, caps: Capability | None) -> None:
    from lmdistill.eval.results import ROLES
    from lmdistill.eval.runner import make_evaluator
    from lmdistill.teachers.registry import is_api_spec

    e = recipe.eval
    assert e is not None
    teacher = recipe.teacher if e.teacher else None
    # An API teacher gives text at most, also when it did not resolve (a key missing).
    text_only = (caps is not None and Capability.FULL_LOGITS not in caps) or (
        caps is None and recipe.teacher is not None and is_api_spec(recipe.teacher)
    )
    specs = [
        (f"eval.tasks.{i}", s.strip()) for i, item in enumerate(e.tasks) for s in item.split(",")
    ]
    for key, spec in specs:
        evaluator = c.run(key, lambda spec=spec: make_evaluator(spec))
        if evaluator is None:
            continue
        in_run = evaluator.needs_teacher or teacher is not None  # the teacher is evaluated
        if text_only and in_run and _scores_every_model(evaluator):
            c.add(key, f"task '{spec}': {_needs_logits(recipe.teacher, caps, 'its scores')}")
        elif evaluator.needs_teacher and teacher is None:
            c.add(key, f"task '{spec}' compares against the teacher: {_no_teacher(recipe)}")
    tools = recipe.generate is not None and recipe.generate.tools is not None
    if not specs and not e.held_out and not tools:
        c.add("eval.tasks", "name at least one task (or set eval.held_out)")
    for role, spec in e.compare.items():
        if role in ROLES:
            c.add(f"eval.compare.{role}", f"a role name of its own is needed, not one of {ROLES}")
        else:
            c.teacher(f"eval.compare.{role}", spec)


def _scores_every_model(evaluator: Any) -> bool:
    """Whether a task needs each model's token scores (as_scoring_model), which a text-only
    teacher cannot give: multiple choice, and teacher-relative tasks but `ref-jsonl` (which
    gives a text-only model its ROUGE-L alone)."""
    kind = evaluator.kind
    return kind == "multiple_choice" or (kind == "teacher_relative" and evaluator.needs_teacher)


def _no_teacher(recipe: RunRecipe) -> str:
    if recipe.teacher is None:
        return "the recipe names no teacher"
    return "eval.teacher is false; set it to true"


def _needs_logits(spec: str | None, caps: Capability | None, purpose: str) -> str:
    have = ", ".join(c.name.lower() for c in Capability if caps and c in caps) or "nothing"
    return f"teacher '{spec}' cannot give full_logits (needed for {purpose}); it gives: {have}"


# -------------------------------------------------------------------------------- train
def check_train_config(config: TrainConfig, source: str) -> None:
    """Every problem of a `lmdistill train` recipe, raised as one RecipeError. Under
    `accelerate launch` the process count and FSDP come from the launcher's environment."""
    checker = _Checker()
    _check_train(
        checker,
        config,
        prefix="",
        data_made=False,
        cache_made=False,
        processes=int(os.environ.get("WORLD_SIZE", "1")),
        fsdp=os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"),
    )
    checker.raise_for(source)


def _check_train(
    c: _Checker,
    config: TrainConfig,
    *,
    prefix: str,
    data_made: bool,
    cache_made: bool,
    processes: int,
    fsdp: bool,
) -> None:
    """data_made / cache_made: an earlier stage writes data.path / teacher.cache, so they need
    not exist yet."""
    from lmdistill.training.config import (
        HiddenObjective,
        LogitsObjective,
        UldObjective,
        logits_source,
    )

    student = _check_student(c, config, prefix)
    teacher = config.teacher
    online = [
        (i, o)
        for i, o in enumerate(config.objectives)
        if isinstance(o, HiddenObjective)
        or (isinstance(o, LogitsObjective) and logits_source(o, teacher) == "online")
    ]
    uld = [i for i, o in enumerate(config.objectives) if isinstance(o, UldObjective)]
    if teacher.model is not None and (online or uld):
        key = f"{prefix}teacher.model"
        caps = c.teacher(key, teacher.model)
        if caps is not None and Capability.FULL_LOGITS not in caps:
            for i, o in online:
                c.add(f"{prefix}objectives.{i}", _needs_logits(teacher.model, caps, o.kind))
            for i in uld:
                c.add(f"{prefix}objectives.{i}", _needs_logits(teacher.model, caps, "uld"))
        elif caps is not None and online:
            _check_same_vocabulary(c, key, config, teacher.model)
            _check_layer_maps(c, prefix, config, student, teacher.model)
    if teacher.cache is not None and not cache_made:
        from lmdistill.teachers.cache import TopkCache

        c.run(f"{prefix}teacher.cache", lambda: TopkCache(teacher.cache))
    data = config.data
    if not data_made:
        _check_data_file(c, f"{prefix}data.path", data.path, config)
    if data.eval_path is not None:
        _check_data_file(c, f"{prefix}data.eval_path", data.eval_path, config)
    if config.batch.tokens_per_micro_batch < data.max_length:  # refused by the loop's setup
        c.add(
            f"{prefix}batch.tokens_per_micro_batch",
            f"{config.batch.tokens_per_micro_batch} must hold one example of "
            f"data.max_length ({data.max_length}) tokens",
        )
    if config.batch.micro_batches_per_step % processes:  # refused by the loop's setup
        c.add(
            f"{prefix}batch.micro_batches_per_step",
            f"{config.batch.micro_batches_per_step} must be a multiple of the {processes} "
            "training processes",
        )
    if config.on_policy is not None and fsdp:
        # Sampling calls the unwrapped student's generate, which needs whole weights.
        c.add(f"{prefix}on_policy", "not supported with FSDP (use DDP or one process)")


def _check_student(c: _Checker, config: TrainConfig, prefix: str) -> tuple[int, int] | None:
    """The student's (layer count, vocabulary size), or None when it cannot be known."""
    from lmdistill.training.students import student_problems

    student = config.student
    if student.lora is not None and importlib.util.find_spec("peft") is None:
        c.add(f"{prefix}student.lora", "LoRA students need PEFT: pip install 'lmdistill[lora]'")
    if student.model is not None:
        shape = c.shape(f"{prefix}student.model", student.model)
        return None if shape is None else (shape.num_hidden_layers, shape.vocab_size)
    ft = student.from_teacher
    assert ft is not None
    shape = c.shape(f"{prefix}student.from_teacher.teacher", ft.teacher)
    if shape is None:
        return None
    problems = student_problems(
        shape,
        layers=ft.layers,
        intermediate_size=ft.intermediate_size,
        hidden_size=ft.hidden_size,
    )
    for name, message in problems.items():
        c.add(f"{prefix}student.from_teacher.{name}", message)
    if "layers" in problems:
        return None
    layers = ft.layers if isinstance(ft.layers, int) else len(ft.layers)
    return layers, shape.vocab_size


def _check_same_vocabulary(c: _Checker, key: str, config: TrainConfig, teacher: str) -> None:
    """Logit and hidden-state KD compare the two models token by token: the loop refuses a
    teacher whose tokenizer's vocabulary differs from the student's. Compared here on the
    tokenizer files when both are on disk (a bundled model not yet converted has none)."""
    student = config.student
    source = student.model if student.model is not None else student.from_teacher.teacher  # type: ignore[union-attr]
    if source == teacher:
        return
    dirs = [_tokenizer_dir(source), _tokenizer_dir(teacher)]
    if None in dirs:
        return
    from transformers import AutoTokenizer

    vocabularies = [AutoTokenizer.from_pretrained(d).get_vocab() for d in dirs]
    if vocabularies[0] != vocabularies[1]:
        c.add(
            key,
            f"teacher '{teacher}' and the student ('{source}') use different tokenizers; logit "
            "and hidden-state distillation need the same vocabulary (use uld)",
        )


def _tokenizer_dir(spec: str) -> Path | None:
    from lmdistill.models import cached_hub_snapshot, hub_name
    from lmdistill.teachers.bundled import BUNDLED_NAMES, cache_root

    if spec in BUNDLED_NAMES:
        converted = cache_root() / "models" / spec
        return converted if (converted / "config.json").is_file() else None
    name = hub_name(spec)
    if name is not None:  # compared only when already cached: a check downloads no tokenizer
        return cached_hub_snapshot(name)
    path = Path(spec).expanduser()
    return path if (path / "config.json").is_file() else None


def _check_layer_maps(
    c: _Checker,
    prefix: str,
    config: TrainConfig,
    student: tuple[int, int] | None,
    teacher: str,
) -> None:
    from lmdistill.training.config import HiddenObjective
    from lmdistill.training.objectives import check_layer_map

    explicit = [
        (i, o.layer_map)
        for i, o in enumerate(config.objectives)
        if isinstance(o, HiddenObjective) and o.layer_map is not None
    ]
    if not explicit or student is None:
        return
    shape = c.shape(f"{prefix}teacher.model", teacher)
    if shape is None:
        return
    for i, layer_map in explicit:
        c.run(
            f"{prefix}objectives.{i}.layer_map",
            lambda m=layer_map: check_layer_map(m, student[0], shape.num_hidden_layers),
        )


def _check_data_file(c: _Checker, key: str, path: str, config: TrainConfig) -> None:
    """The file exists and its first record is a training conversation (as the loop reads it)."""
    from lmdistill.data.records import first_record
    from lmdistill.data.sft import conversation, record_answer_start

    def check() -> None:
        line, record = first_record(path, field_map(config.data.fields))
        messages = conversation(record, path, line)
        if config.data.span_weights is not None:
            record_answer_start(record, messages, path, line)

    c.run(key, check)


# ------------------------------------------------------------------------- self-distill
def check_self_distill(config: SelfDistillConfig, source: str) -> None:
    """Every problem of a `lmdistill self-distill` recipe, raised as one RecipeError."""
    from lmdistill.pipelines.self_distill import load_reward

    c = _Checker()
    # The model samples (load_teacher) and is fine-tuned (a local model dir): both must work.
    if c.teacher("model", config.model) is not None:
        c.shape("model", config.model)
    _check_task(c, "task", config.task)
    kind, _, rest = config.scorer.partition(":")
    if kind == "reward":
        c.run("scorer", lambda: load_reward(rest))
    elif kind == "teacher_loglik":
        caps = c.teacher("scorer", rest, {"batch_size": config.sampling.batch_size})
        if caps is not None and Capability.FULL_LOGITS not in caps:
            c.add("scorer", _needs_logits(rest, caps, "the teacher_loglik scorer"))
    t = config.train
    if t.batch.tokens_per_micro_batch < t.max_length:  # refused by each round's training
        c.add(
            "train.batch.tokens_per_micro_batch",
            f"{t.batch.tokens_per_micro_batch} must hold one example of "
            f"train.max_length ({t.max_length}) tokens",
        )
    c.raise_for(source)
