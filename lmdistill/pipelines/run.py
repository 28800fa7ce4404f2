"""`lmdistill run RECIPE.yaml`: the whole job as stages, each skipped when nothing it depends on
changed.

    prompts -> generate -> filter -> cache_logits -> train -> eval -> report

A recipe names the stages it wants (a section per stage; `train` is a training recipe without
`run_dir` and `data.path`, which the pipeline fills in). Every stage writes under `run_dir`:

    prompts.jsonl          the prompts (from a JSONL file or a task's examples, template applied)
    responses.jsonl        the teacher's responses (`generate`; tool-use traces with `tools`)
    filtered.jsonl         the responses that pass the filter (+ filtered.stats.json)
    cache/                 the teacher's top-k log-probs (`cache-logits`)
    train/                 the training run; train/final is the student
    eval/results.pickle    the evaluation results
    report/                report.md / report.html / report.json
    .run/state.json        each stage's fingerprint and status

A stage's fingerprint hashes its settings, the fingerprints of the stages it reads and the
contents of the user files it reads. A stage whose fingerprint matches a finished run, and whose
output is whole (written through `lmdistill.store`; a half-written one is finished), is skipped;
a changed one is re-run from scratch (its old outputs removed first); an interrupted one with the
same fingerprint resumes (generation, caching and training all continue where they stopped).
`--from STAGE` re-runs that stage and every stage after it.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lmdistill.data.jsonl import write_json_atomic, write_jsonl_atomic
from lmdistill.data.records import Fields, field_map, source_digest, source_exists
from lmdistill.errors import RecipeError, UserError, say
from lmdistill.store.atomic import atomic_dir, is_whole_dir, write_bytes_atomic, write_text_atomic
from lmdistill.store.settings import changed_settings

STAGES = ("prompts", "generate", "filter", "cache_logits", "train", "eval", "report")
STATE_FORMAT = "lmdistill.run/1"


# ------------------------------------------------------------------------------------- recipe
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PromptsStage(_Strict):
    """Where the prompts come from: a JSONL file (`prompt` or `messages` per line) or a task."""

    path: str | None = Field(
        None,
        description="prompts: JSONL, Parquet or CSV, a save_to_disk dir, or hf:NAME[:CONFIG][@SPLIT]",
    )
    fields: Fields = Field(None, description="field mapping: alpaca, dolly, sharegpt or KEY=COLUMN")
    task: str | None = Field(None, description="a task spec (see `lmdistill eval --help`)")
    split: str | None = Field(
        None, description="file: keep records whose 'split' equals it; task: default 'train'"
    )
    limit: int | None = Field(None, ge=1)
    seed: int = 0
    template: str | None = Field(None, description="a reasoning template, e.g. step_by_step")

    @model_validator(mode="after")
    def _one_source(self) -> PromptsStage:
        if (self.path is None) == (self.task is None):
            raise ValueError("give exactly one of prompts.path and prompts.task")
        return self


class GenerateStage(_Strict):
    """Teacher responses to the prompts (the data of response distillation)."""

    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(256, ge=1)
    n: int = Field(1, ge=1, description="responses per prompt (rejection sampling: n > 1)")
    system: str | None = None
    tools: list[str] | None = Field(
        None, description="tool-use traces: the tool loop with these tools ([] = all)"
    )
    max_turns: int = Field(4, ge=1, description="tool calls per trace, at most")

    @model_validator(mode="after")
    def _sampling(self) -> GenerateStage:
        if self.n > 1 and self.temperature == 0:
            raise ValueError("n > 1 needs temperature > 0 (greedy gives the same answer n times)")
        return self


class FilterStage(_Strict):
    """Keep the responses the task's scorer accepts (verification, rejection sampling)."""

    task: str | None = Field(None, description="scorer; default: prompts.task")
    keep: Literal["best", "all"] = "best"
    min_score: float = Field(1.0, ge=0, le=1)
    dedupe: bool = True


class CacheStage(_Strict):
    """The teacher's top-k log-probs on the training data, so training loads no teacher."""

    top_k: int = Field(32, ge=1)
    tokens_per_batch: int = Field(8192, ge=2)


class EvalStage(_Strict):
    tasks: list[str] = Field(default_factory=list)
    held_out: bool = Field(
        False, description="teacher-relative metrics on the responses with split 'test'"
    )
    teacher: bool = Field(True, description="evaluate the teacher too (retention)")
    compare: dict[str, str] = Field(default_factory=dict, description="role -> model to compare")
    limit: int | None = Field(None, ge=1)
    max_tokens: int = Field(256, ge=1)
    batch_size: int = Field(16, ge=1)
    measure_cost: bool = True


class Launch(_Strict):
    """Train in several processes: the train stage runs `accelerate launch` (DDP; FSDP through
    an accelerate config file) instead of training in the pipeline's own process."""

    num_processes: int = Field(2, ge=2)
    config_file: str | None = Field(None, description="an accelerate config (FSDP, ...)")
    args: list[str] = Field(default_factory=list, description="more `accelerate launch` flags")


class RunRecipe(_Strict):
    run_dir: str
    teacher: str | None = Field(None, description="teacher spec for generation, caching, eval")
    teacher_options: dict[str, Any] = Field(
        default_factory=dict, description="e.g. base_url, concurrency, api_key_env, batch_size"
    )
    prompts: PromptsStage | None = None
    generate: GenerateStage | None = None
    filter: FilterStage | None = None
    cache_logits: CacheStage | None = None
    train: dict[str, Any] | None = None
    launch: Launch | None = None
    eval: EvalStage | None = None
    report: bool = True

    @model_validator(mode="after")
    def _wiring(self) -> RunRecipe:
        if self.generate is not None and self.prompts is None:
            raise ValueError("generate: needs a prompts section")
        if self.generate is not None and self.generate.tools is not None:
            if self.prompts is None or self.prompts.task is None:
                raise ValueError(
                    "generate.tools: tool-use traces need prompts.task (e.g. tool_use)"
                )
            if self.generate.n > 1:
                raise ValueError("generate.n: the tool loop makes one trace per prompt")
            from lmdistill.tasks.tools import tool_subset

            try:
                tool_subset(self.generate.tools)  # unknown tool names fail at load
            except UserError as exc:
                raise ValueError(f"generate.tools: {exc}") from None
        if (self.generate is not None or self.cache_logits is not None) and self.teacher is None:
            raise ValueError("teacher: required by generate and cache_logits")
        if self.filter is not None:
            if self.generate is None:
                raise ValueError("filter: needs a generate section")
            tools = self.generate.tools is not None
            if (
                not tools
                and self.filter.task is None
                and (self.prompts is None or self.prompts.task is None)
            ):
                raise ValueError("filter.task: required when the prompts do not come from a task")
        if self.cache_logits is not None and self.train is None:
            raise ValueError("cache_logits: needs a train section (it caches the training data)")
        if self.eval is not None and self.train is None:
            raise ValueError("eval: needs a train section (it evaluates the trained student)")
        if self.eval is not None and self.eval.held_out and self.generate is None:
            raise ValueError("eval.held_out: needs a generate section (the held-out responses)")
        return self


def load_recipe(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, check: bool = True
) -> RunRecipe:
    """Read a run recipe (`key=value` overrides as in `lmdistill train`) and check all of it
    before any stage runs (`lmdistill.pipelines.validate`): a RecipeError lists every problem.
    check=False: the settings only, not the models, files and keys the machine must have."""
    from lmdistill.training.config import apply_override, describe_lines, read_yaml_mapping

    path = Path(path)
    raw = read_yaml_mapping(path)
    for item in overrides:
        apply_override(raw, item)
    try:
        recipe = RunRecipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(str(path), describe_lines(exc)) from None
    if not check:
        train_config(recipe, str(path))
        return recipe
    from lmdistill.pipelines.validate import check_run_recipe

    check_run_recipe(recipe, str(path))  # every problem now, none after hours of generation
    return recipe


# -------------------------------------------------------------------------------------- paths
@dataclass(frozen=True)
class Paths:
    root: Path

    @property
    def prompts(self) -> Path:
        return self.root / "prompts.jsonl"

    @property
    def responses(self) -> Path:
        return self.root / "responses.jsonl"

    @property
    def filtered(self) -> Path:
        return self.root / "filtered.jsonl"

    @property
    def held_out(self) -> Path:
        return self.root / "held_out.jsonl"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def train(self) -> Path:
        return self.root / "train"

    @property
    def results(self) -> Path:
        return self.root / "eval" / "results.pickle"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def state(self) -> Path:
        return self.root / ".run" / "state.json"


def training_data(recipe: RunRecipe, paths: Paths) -> str | None:
    """The file the train (and cache) stage reads: the filtered or generated responses, else the
    recipe's own train.data.path."""
    if recipe.filter is not None:
        return str(paths.filtered)
    if recipe.generate is not None:
        return str(paths.responses)
    return ((recipe.train or {}).get("data") or {}).get("path")


def train_config(recipe: RunRecipe, source: str):
    """The train section as a validated TrainConfig, with run_dir, data.path and the teacher
    (cache or model) filled in from the rest of the recipe."""
    from lmdistill.training.config import validate

    if recipe.train is None:
        return None
    paths = Paths(Path(recipe.run_dir))
    raw = json.loads(json.dumps(recipe.train))  # a deep copy; the recipe stays as written
    if "run_dir" in raw:
        raise RecipeError(source, ["train.run_dir: set by the pipeline (run_dir/train); remove it"])
    raw["run_dir"] = str(paths.train)
    data = raw.setdefault("data", {})
    if not isinstance(data, dict):
        raise RecipeError(source, ["train.data: must be a mapping"])
    produced = recipe.generate is not None
    if produced and "path" in data:
        raise RecipeError(source, ["train.data.path: the generate stage makes the data; remove it"])
    if not produced and "path" not in data:
        raise RecipeError(source, ["train.data.path: required when there is no generate stage"])
    data.setdefault("path", training_data(recipe, paths))
    teacher = raw.setdefault("teacher", {})
    if recipe.cache_logits is not None:
        teacher.setdefault("cache", str(paths.cache))
    elif recipe.teacher is not None and _needs_online_teacher(raw):
        teacher.setdefault("model", recipe.teacher)
    return validate(raw, source, key_prefix="train.")


def _needs_online_teacher(raw: dict[str, Any]) -> bool:
    kinds = {o.get("kind") for o in raw.get("objectives", []) if isinstance(o, dict)}
    return bool(kinds - {"sft"}) or "on_policy" in raw


# ------------------------------------------------------------------------------------- stages
@dataclass
class Stage:
    name: str
    settings: dict[str, Any]  # what the stage does (hashed)
    reads: list[str]  # earlier stages whose outputs it reads
    files: list[Path]  # user data it reads (files, saved datasets, hf: specs; by content)
    outputs: list[Path]  # removed before a re-run with changed settings
    work: Callable[[], str | None]  # returns a one-line summary (or None)
    # Whether the first output is whole, when it can exist half-written (a dir an interrupted
    # save of an older version left); None: it is written atomically, so existing means whole.
    whole: Callable[[], bool] | None = None

    def output_state(self) -> Literal["missing", "whole", "torn"]:
        """'missing', 'whole', or 'torn' (the stage is then resumed to finish it)."""
        if not self.outputs[0].exists():
            return "missing"
        return "whole" if self.whole is None or self.whole() else "torn"


def plan(recipe: RunRecipe, source: str = "recipe") -> list[Stage]:
    """The recipe's stages, in order."""
    from lmdistill.store.settings import side_path

    paths = Paths(Path(recipe.run_dir))
    stages: list[Stage] = []
    teacher = {"teacher": recipe.teacher, "options": _public_options(recipe.teacher_options)}
    if recipe.prompts is not None:
        p = recipe.prompts
        files = [Path(p.path)] if p.path else []
        stages.append(
            Stage(
                "prompts",
                p.model_dump(),
                [],
                files,
                [paths.prompts],
                lambda: make_prompts(p, paths.prompts),
            )
        )
    if recipe.generate is not None:
        g = recipe.generate
        stages.append(
            Stage(
                "generate",
                {**g.model_dump(), **teacher},
                ["prompts"],
                [],
                [
                    paths.responses,
                    paths.held_out,
                    *(side_path(paths.responses, x) for x in (".meta.json", ".failed.jsonl")),
                ],
                lambda: run_generate(recipe, paths),
            )
        )
    if recipe.filter is not None:
        f = recipe.filter
        task = f.task or (recipe.prompts.task if recipe.prompts else None)
        stages.append(
            Stage(
                "filter",
                {**f.model_dump(), "task": task},
                ["generate"],
                [],
                [paths.filtered, paths.filtered.with_suffix(".stats.json")],
                lambda: run_filter(recipe, paths, task),
            )
        )
    config = train_config(recipe, source)
    upstream = [s.name for s in stages if s.name in ("generate", "filter")][-1:]
    data_files = [] if upstream else [Path(config.data.path)] if config is not None else []
    if recipe.cache_logits is not None and config is not None:
        c = recipe.cache_logits
        stages.append(
            Stage(
                "cache_logits",
                {**c.model_dump(), **teacher, "max_length": config.data.max_length},
                upstream,
                data_files,
                [paths.cache],
                lambda: run_cache(recipe, config, paths),
            )
        )
    if config is not None:
        reads = upstream + (["cache_logits"] if recipe.cache_logits is not None else [])
        stages.append(
            Stage(
                "train",
                {
                    **config.model_dump(mode="json"),
                    "launch": recipe.launch.model_dump() if recipe.launch else None,
                },
                reads,
                data_files,
                [paths.train],
                lambda: run_train(config, recipe.launch, paths),
                whole=lambda: _trained(paths.train),
            )
        )
    if recipe.eval is not None:
        e = recipe.eval
        stages.append(
            Stage(
                "eval",
                {**e.model_dump(), **teacher},
                ["train", *(["generate"] if e.held_out else [])],
                [],
                [paths.results],
                lambda: run_eval(recipe, paths),
            )
        )
        if recipe.report:
            stages.append(
                Stage(
                    "report",
                    {},
                    ["eval"],
                    [],
                    [paths.report],
                    lambda: run_report(paths),
                    whole=lambda: is_whole_dir(paths.report),
                )
            )
    return stages


def _public_options(options: dict[str, Any]) -> dict[str, Any]:
    """Teacher options as hashed and printed: never a key itself (only the env var's name)."""
    secret = {"api_key", "key", "token", "password"}
    return {k: ("***" if k.lower() in secret else v) for k, v in sorted(options.items())}


# ------------------------------------------------------------------------------ stage bodies
def make_prompts(p: PromptsStage, out: Path) -> str:
    """Write the prompts file: records from a JSONL file (split filter, limit) or a task's
    examples (id, messages, reference, metadata), with the reasoning template applied."""
    from lmdistill.tasks.base import seeded_subset

    if p.task is not None:
        from lmdistill.skills.reasoning import task_prompts
        from lmdistill.tasks.registry import get_task

        records = task_prompts(
            get_task(p.task),
            split=p.split or "train",
            limit=p.limit,
            seed=p.seed,
            template=p.template,
        )
    else:
        from lmdistill.pipelines.generate import read_prompts

        prompts = read_prompts(p.path, field_map(p.fields))
        if p.split is not None:
            prompts = [q for q in prompts if q.fields.get("split") == p.split]
            if not prompts:
                raise UserError(f"{p.path}: no record has split '{p.split}'")
        prompts = seeded_subset(prompts, p.limit, p.seed)
        records = [{"id": q.id, "messages": q.messages, **q.fields} for q in prompts]
        if p.template is not None:
            from lmdistill.skills.reasoning import apply_template

            for record in records:
                record["messages"] = apply_template(record["messages"], p.template)
    write_jsonl_atomic(out, records)
    return f"{len(records)} prompts"


def _load_teacher(recipe: RunRecipe, **extra: Any):
    from lmdistill.teachers.registry import load_teacher

    return load_teacher(recipe.teacher, **{**extra, **recipe.teacher_options})


def run_generate(recipe: RunRecipe, paths: Paths) -> str:
    from lmdistill.pipelines.generate import read_prompts
    from lmdistill.store.settings import side_path
    from lmdistill.teachers import SamplingParams

    g = recipe.generate
    assert g is not None
    params = SamplingParams(
        temperature=g.temperature, top_p=g.top_p, max_tokens=g.max_tokens, n=g.n
    )
    teacher = _load_teacher(recipe)
    try:
        if g.tools is not None:  # [] = all the tools
            from lmdistill.skills.tool_use import GENERATION_FAILED, generate_tool_traces
            from lmdistill.tasks.registry import get_task
            from lmdistill.tasks.tools import tool_subset

            p = recipe.prompts
            assert p is not None and p.task is not None
            counts = generate_tool_traces(
                teacher,
                get_task(p.task),
                paths.responses,
                tools=tool_subset(g.tools),
                split=p.split or "train",
                limit=p.limit,
                seed=p.seed,
                max_turns=g.max_turns,
                params=params,
            )
            failed = counts.pop(GENERATION_FAILED, 0)
            if failed:
                raise UserError(
                    f"generate: {failed} tool-use traces failed (listed in "
                    f"{side_path(paths.responses, '.failed.jsonl')}); run again to retry them"
                )
            line = f"{sum(counts.values())} tool-use traces {counts}"
        else:
            from lmdistill.pipelines.generate import generate

            summary = generate(
                teacher, read_prompts(paths.prompts), paths.responses, params, system=g.system
            )
            summary.check_reachable(teacher.name)
            if summary.failed:
                raise UserError(
                    f"generate: {sum(summary.failed.values())} prompts failed "
                    f"({dict(summary.failed)}); run again to retry them"
                )
            line = f"{summary.samples} responses ({summary.generated} new)"
    finally:
        teacher.close()
    from lmdistill.pipelines.quickstart import held_out_file

    held_out_file(paths.responses, paths.held_out)
    return line


def run_filter(recipe: RunRecipe, paths: Paths, task_spec: str | None) -> str:
    from lmdistill.tasks.registry import get_task

    f = recipe.filter
    assert f is not None and recipe.generate is not None
    if recipe.generate.tools is not None:
        from lmdistill.skills.tool_use import filter_tool_traces
        from lmdistill.tasks.tools import tool_subset

        task = get_task(task_spec) if task_spec else None
        stats = filter_tool_traces(
            paths.responses, paths.filtered, tool_subset(recipe.generate.tools), task=task
        )
        write_json_atomic(paths.filtered.with_suffix(".stats.json"), asdict(stats))
        return stats.report()
    from lmdistill.skills.reasoning import filter_file

    assert task_spec is not None
    stats = filter_file(
        paths.responses,
        paths.filtered,
        get_task(task_spec),
        keep=f.keep,
        min_score=f.min_score,
        dedupe=f.dedupe,
    )
    return stats.report()


def run_cache(recipe: RunRecipe, config, paths: Paths) -> str:
    from lmdistill.teachers.cache import build_cache

    c = recipe.cache_logits
    assert c is not None
    teacher = _load_teacher(recipe)
    try:
        report = build_cache(
            teacher,
            config.data.path,
            paths.cache,
            top_k=c.top_k,
            max_length=config.data.max_length,
            tokens_per_batch=max(c.tokens_per_batch, config.data.max_length),
            fields=field_map(config.data.fields),
        )
    finally:
        teacher.close()
    return f"{report.positions} positions, {report.bytes_per_token:.1f} bytes/token"


def _trained(run_dir: Path) -> bool:
    from lmdistill.training.loop import is_trained  # imports torch: only when asked

    return is_trained(run_dir)


def run_train(config, launch: Launch | None, paths: Paths) -> str:
    from lmdistill.training.loop import is_trained, latest_checkpoint, train_unless_done

    run_dir = Path(config.run_dir)
    final = run_dir / "final"
    if launch is None:
        result = train_unless_done(config)
        return (
            f"student at {final}" if result is None else f"{result.steps} steps; student at {final}"
        )
    if is_trained(run_dir):
        return f"student at {final}"
    resume = latest_checkpoint(run_dir) is not None
    launch_training(config, launch, paths.root / "train.yaml", resume=resume)
    return f"{launch.num_processes} processes; student at {final}"


def launch_command(launch: Launch, recipe_path: Path, *, resume: bool) -> list[str]:
    """`accelerate launch ... -m lmdistill train RECIPE`. Without a config file: DDP over
    `num_processes` (`--multi_gpu`, which on a CPU-only machine starts gloo processes;
    accelerate's `--cpu` launcher would start only one)."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if launch.config_file is not None:
        command += ["--config_file", launch.config_file]
    else:
        command += ["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no"]
    command += ["--num_processes", str(launch.num_processes), *launch.args]
    command += ["-m", "lmdistill", "train", str(recipe_path)]
    return command + (["--resume"] if resume else [])


def launch_training(config, launch: Launch, recipe_path: Path, *, resume: bool) -> None:
    import subprocess

    from lmdistill.training.config import dump

    write_text_atomic(recipe_path, dump(config))
    command = launch_command(launch, recipe_path, resume=resume)
    say("  " + " ".join(command[2:]))
    if subprocess.run(command).returncode != 0:
        raise UserError(f"train: `accelerate launch` failed (see above); recipe {recipe_path}")


def run_eval(recipe: RunRecipe, paths: Paths) -> str:
    """evaluate() on the recipe's tasks, plus the held-out prompts (`eval.held_out`) and, for
    tool-use recipes, the tool loop on the task's test split; saved for the report stage."""
    from lmdistill.eval.base import EvalSettings
    from lmdistill.eval.runner import evaluate

    e = recipe.eval
    assert e is not None
    tasks = [*eval_extra_tasks(recipe, paths), *e.tasks]
    if not tasks:
        raise UserError("eval.tasks: name at least one task (or set eval.held_out)")
    results = evaluate(
        str(paths.train / "final"),
        tasks,
        teacher=recipe.teacher if e.teacher else None,
        teacher_options=recipe.teacher_options,
        extra=e.compare or None,
        settings=EvalSettings(limit=e.limit, max_tokens=e.max_tokens, batch_size=e.batch_size),
        cache_dir=paths.root / "eval" / "cache",
        measure_cost=e.measure_cost,
        run_dir=paths.train,
    )
    write_bytes_atomic(paths.results, pickle.dumps({"results": results}))
    return f"{len(results.tasks)} tasks"


def eval_extra_tasks(recipe: RunRecipe, paths: Paths) -> list[str]:
    """The task specs the recipe implies: the held-out prompts (`eval.held_out`) and the tool
    loop on the prompts' task with the generate stage's tools and turns (`generate.tools`)."""
    from lmdistill.eval.tool_use import ToolUseSpec

    e, g, p = recipe.eval, recipe.generate, recipe.prompts
    assert e is not None
    tasks = [held_out_task(recipe, paths)] if e.held_out else []
    if g is not None and g.tools is not None:
        assert p is not None and p.task is not None  # checked when the recipe loads
        tasks.append(str(ToolUseSpec(p.task, tuple(g.tools), g.max_turns)))
    return tasks


def held_out_task(recipe: RunRecipe, paths: Paths) -> str:
    """The held-out prompts as an eval task: teacher-relative (KL, top-1 agreement, ROUGE-L)
    when the teacher is evaluated and gives its logits; otherwise compared with the teacher's
    answers in the file alone (ROUGE-L, perplexity), which is what a text-only teacher (an API)
    or `eval.teacher: false` allows (issue 16)."""
    from lmdistill.teachers.base import Capability
    from lmdistill.teachers.registry import check_teacher

    assert recipe.eval is not None and recipe.teacher is not None  # generate needs a teacher
    if recipe.eval.teacher:
        caps = check_teacher(recipe.teacher, **recipe.teacher_options)
        if Capability.FULL_LOGITS in caps:
            return f"rel-jsonl:{paths.held_out}"
    return f"ref-jsonl:{paths.held_out}"


def run_report(paths: Paths) -> str:
    from lmdistill.eval.report import write_report

    saved = pickle.loads(paths.results.read_bytes())  # written by our own eval stage
    if saved.get("results") is None:
        raise UserError(f"{paths.results}: no evaluation results; run again with --from eval")
    with atomic_dir(paths.report) as tmp:
        write_report(saved["results"], tmp)
    return f"report at {paths.report / 'report.md'}"


# ----------------------------------------------------------------------------------- runner
@dataclass
class StageResult:
    name: str
    status: str  # "ran", "skipped (unchanged)", "would run (...)", ...
    seconds: float = 0.0
    summary: str | None = None


@dataclass
class RunResult:
    run_dir: Path
    stages: list[StageResult] = field(default_factory=list)
    report: Path | None = None


def fingerprints(stages: list[Stage], *, missing_ok: bool = False) -> dict[str, str]:
    """Each stage's fingerprint: its settings, the user files it reads (by content) and the
    fingerprints of the stages it reads, so a change upstream changes everything downstream."""
    return {name: _digest(inputs) for name, inputs in stage_inputs(stages, missing_ok).items()}


def stage_inputs(stages: list[Stage], missing_ok: bool = False) -> dict[str, dict[str, Any]]:
    """What each stage's fingerprint hashes, as JSON values: saved with the stage's state, so a
    re-run can say which of them changed (`changed_settings`)."""
    out: dict[str, dict[str, Any]] = {}
    prints: dict[str, str] = {}
    for stage in stages:
        files = {}
        for path in stage.files:
            if source_exists(path):
                files[str(path)] = source_digest(path)
            elif missing_ok:
                files[str(path)] = "missing"
            else:
                raise UserError(f"{path}: no such file (read by the {stage.name} stage)")
        payload = {
            "stage": stage.name,
            "settings": stage.settings,
            "files": files,
            "reads": {name: prints[name] for name in stage.reads if name in prints},
        }
        out[stage.name] = json.loads(json.dumps(payload, sort_keys=True, default=str))
        prints[stage.name] = _digest(out[stage.name])
    return out


def _digest(inputs: dict[str, Any]) -> str:
    text = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _changed_inputs(before: dict[str, Any], now: dict[str, Any]) -> str:
    """'max_tokens, prompts.jsonl' for what differs between two `stage_inputs` entries: settings
    by key, files by name, an upstream stage by name; at most three, then '...'."""
    names = []
    for key in changed_settings(before, now):
        kind, _, rest = key.partition(".")
        names.append(Path(rest).name if kind == "files" else rest or kind)
    names = list(dict.fromkeys(names))
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def _read_state(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # unreadable state: every stage re-runs, outputs are re-checked by each stage
    return state.get("stages", {}) if state.get("format") == STATE_FORMAT else {}


def _write_state(path: Path, stages: dict[str, Any]) -> None:
    write_json_atomic(path, {"format": STATE_FORMAT, "stages": stages})


def decide(
    stages: list[Stage], prints: dict[str, str], state: dict[str, Any], start: str | None
) -> dict[str, str]:
    """What each stage will do: 'skip', 'resume', 'run' (fresh: settings changed or never run)."""
    forced_from = STAGES.index(start) if start is not None else len(STAGES)
    actions: dict[str, str] = {}
    for stage in stages:
        prev = state.get(stage.name, {})
        same = prev.get("fingerprint") == prints[stage.name]
        forced = STAGES.index(stage.name) >= forced_from
        upstream_ran = any(actions.get(name) != "skip" for name in stage.reads)
        if same and prev.get("status") == "done" and not forced and not upstream_ran:
            # The first output is the stage's product; it vanishing means run again, and it left
            # half-written (issue 19) means finishing it.
            output = stage.output_state()
            actions[stage.name] = {"whole": "skip", "missing": "run", "torn": "resume"}[output]
        elif same and prev.get("status") == "running" and not forced:
            actions[stage.name] = "resume"
        else:
            actions[stage.name] = "run"
    return actions


def _reason(action: str, stage: str, state: dict[str, Any], inputs: dict[str, Any]) -> str:
    prev = state.get(stage)
    if action == "skip":
        return "skipped (unchanged)"
    if action == "resume":
        return "resume (interrupted)"
    if prev is None:
        return "run (new)"
    if prev.get("fingerprint") != _digest(inputs[stage]):
        if isinstance(prev.get("inputs"), dict):  # saved since issue 14
            return f"run (changed: {_changed_inputs(prev['inputs'], inputs[stage])})"
        return "run (settings or inputs changed)"
    return "run (forced or upstream re-ran)"


def run_recipe(
    recipe: RunRecipe,
    *,
    start: str | None = None,
    dry_run: bool = False,
    source: str = "recipe",
    log: Callable[[str], None] | None = None,
) -> RunResult:
    """Run (or, with dry_run, only plan) the recipe's stages; see the module docstring."""
    log = log or say
    if start is not None and start not in STAGES:
        raise UserError(f"--from: unknown stage '{start}'; stages: {', '.join(STAGES)}")
    stages = plan(recipe, source)
    if start is not None and start not in {s.name for s in stages}:
        names = ", ".join(s.name for s in stages)
        raise UserError(f"--from: this recipe has no '{start}' stage; its stages: {names}")
    paths = Paths(Path(recipe.run_dir))
    inputs = stage_inputs(stages, missing_ok=dry_run)
    prints = {name: _digest(entry) for name, entry in inputs.items()}
    state = _read_state(paths.state)
    actions = decide(stages, prints, state, start)
    result = RunResult(paths.root)
    if dry_run:
        for stage in stages:
            reason = _reason(actions[stage.name], stage.name, state, inputs)
            missing = [str(p) for p in stage.files if not source_exists(p)]
            note = f"; missing input {missing[0]}" if missing else ""
            result.stages.append(StageResult(stage.name, f"would {reason}{note}"))
        return result
    paths.root.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        action = actions[stage.name]
        if action == "skip":
            log(f"[{stage.name}] unchanged, skipped")
            result.stages.append(StageResult(stage.name, "skipped (unchanged)"))
            continue
        if action == "run":
            _remove(stage.outputs)
        if action == "resume" and state.get(stage.name, {}).get("status") == "done":
            log(f"[{stage.name}] its output is incomplete (a write was interrupted); finishing it")
        state[stage.name] = {
            "fingerprint": prints[stage.name],
            "status": "running",
            "inputs": inputs[stage.name],
        }
        _write_state(paths.state, state)
        log(f"[{stage.name}] {'resuming' if action == 'resume' else 'running'} ...")
        began = time.perf_counter()
        summary = stage.work()
        seconds = time.perf_counter() - began
        state[stage.name] = {
            "fingerprint": prints[stage.name],
            "status": "done",
            "inputs": inputs[stage.name],
            "seconds": round(seconds, 1),
            "summary": summary,
        }
        _write_state(paths.state, state)
        log(f"[{stage.name}] done in {seconds:.1f}s" + (f": {summary}" if summary else ""))
        status = "resumed" if action == "resume" else "ran"
        result.stages.append(StageResult(stage.name, status, round(seconds, 1), summary))
    if recipe.report and recipe.eval is not None:
        result.report = paths.report / "report.md"
    return result


def _remove(outputs: list[Path]) -> None:
    for path in outputs:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def summary_table(result: RunResult) -> str:
    lines = [f"  {'stage':<13}{'status':<36}{'time':>8}"]
    for row in result.stages:
        time_text = f"{row.seconds:.1f}s" if row.status in ("ran", "resumed") else "-"
        lines.append(f"  {row.name:<13}{row.status:<36}{time_text:>8}")
    return "\n".join(lines)


def describe_plan(recipe: RunRecipe, result: RunResult) -> str:
    """The resolved recipe and what each stage would do (`--dry-run`)."""
    shown = recipe.model_dump(mode="json", exclude_none=True)
    shown["teacher_options"] = _public_options(recipe.teacher_options)
    text = yaml.safe_dump(shown, sort_keys=False)
    return f"{text}\nplan ({result.run_dir}):\n{summary_table(result)}"
