"""Self-distillation: a model improves on a verifiable task by fine-tuning on its own best samples
(rejection-sampling fine-tuning / expert iteration: STaR, Zelikman et al. 2022; ReST-EM, Singh et
al. 2023; RFT, Yuan et al. 2023).

    lmdistill self-distill recipes/self_distill.yaml [key=value ...] [--dry-run]

Round 0 evaluates the start model. Each round r = 1..R then
  1. sample    n responses per train prompt from the current model (temperature > 0)
  2. score     each response: the task's own `score`, a reward function, or the mean per-token
               log-likelihood under a teacher
  3. select    per prompt the best response (or every one) reaching `min_score`
               (`lmdistill.skills.reasoning.filter_traces`)
  4. train     SFT of the current model on the kept responses (`lmdistill.training.train`)
  5. eval      greedy answers to held-out examples, asked with the recipe's template and graded
               by the task's score (`lmdistill.eval.runner.evaluate`, spec template:NAME:TASK)
and the trained model is the next round's current model. Early stopping: after `patience` rounds
in a row without an improvement of at least `min_improvement` over the best score so far.

Run dir: config.yaml, prompts.jsonl, eval_cache/ (`evaluate`'s result cache), round_0/ ..
round_R/ (samples.jsonl, kept.jsonl + kept.stats.json, train/ (a training run; train/final is
the round's model), eval.jsonl, metrics.json, done), rounds.json, rounds.md, rounds.png. A rerun
continues after the last finished round (a round is finished when its `done` marker exists;
sampling and training inside an unfinished round continue where they stopped, and an evaluation
already made is read from the cache).
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lmdistill.errors import RecipeError, UserError, say
from lmdistill.store.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from lmdistill.store.settings import changed_settings
from lmdistill.training.config import (
    Batch,
    Optim,
    apply_override,
    describe_lines,
    read_yaml_mapping,
)

if TYPE_CHECKING:
    from lmdistill.eval.base import EvalSettings
    from lmdistill.eval.generation import GenerationEval
    from lmdistill.tasks.base import Task

DONE = "done"
EVAL_CACHE = "eval_cache"  # the held-out results, by (model fingerprint, task, settings)
SCORER_FORMS = ("task", "reward:MODULE:FUNCTION", "teacher_loglik:SPEC")


# ------------------------------------------------------------------------------------- config
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainPrompts(_Strict):
    split: Literal["train", "test"] = "train"
    limit: int | None = Field(100, ge=1, description="prompts sampled each round")
    seed: int = 0


class EvalSet(_Strict):
    split: Literal["train", "test"] = "test"
    limit: int | None = Field(80, ge=1, description="held-out examples scored each round")
    seed: int = 0
    max_tokens: int | None = Field(None, ge=1, description="default: sampling.max_tokens")


class Sampling(_Strict):
    n: int = Field(4, ge=1, description="samples per prompt")
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(128, ge=1)
    batch_size: int = Field(32, ge=1, description="sequences per generate call")


class Selection(_Strict):
    keep: Literal["best", "threshold"] = Field(
        "best", description="best: one sample per prompt; threshold: every sample >= min_score"
    )
    min_score: float | None = Field(
        1.0, description="samples below it are never kept; null: no threshold"
    )
    dedupe: bool = True


class Training(_Strict):
    """The SFT run of each round (a `TrainConfig` with the `sft` objective)."""

    optim: Optim = Optim(lr=1e-5, epochs=1.0, warmup_steps=0, schedule="constant")
    batch: Batch = Batch(tokens_per_micro_batch=2048)
    max_length: int = Field(512, ge=2)
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"


class EarlyStop(_Strict):
    patience: int | None = Field(
        None, ge=1, description="stop after this many rounds without improvement; null: never"
    )
    min_improvement: float = Field(0.0, ge=0, description="what counts as an improvement")


class SelfDistillConfig(_Strict):
    run_dir: str
    model: str = Field(description="the start model: a bundled name or an HF model dir")
    task: str = Field(description="a task spec, as for `lmdistill eval --tasks`")
    template: str | None = Field(None, description="a reasoning template, e.g. concise")
    rounds: int = Field(2, ge=1)
    seed: int = 0
    prompts: TrainPrompts = TrainPrompts()
    eval: EvalSet = EvalSet()
    sampling: Sampling = Sampling()
    scorer: str = Field("task", description=" | ".join(SCORER_FORMS))
    select: Selection = Selection()
    train: Training = Training()
    early_stop: EarlyStop = EarlyStop()
    progress: bool = True

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str | None) -> str | None:
        from lmdistill.skills.reasoning import TEMPLATES

        if value is not None and value not in TEMPLATES:
            raise ValueError(f"unknown template; choose one of: {', '.join(TEMPLATES)}")
        return value

    @field_validator("scorer")
    @classmethod
    def _scorer_form(cls, value: str) -> str:
        kind, _, rest = value.partition(":")
        ok = (
            (kind == "task" and not rest)
            or (kind == "reward" and rest.count(":") == 1 and all(rest.split(":")))
            or (kind == "teacher_loglik" and rest)
        )
        if not ok:
            raise ValueError(f"expected one of {', '.join(SCORER_FORMS)}")
        return value


# Keys a rerun may change: extending a run by more rounds, or stopping it earlier.
_RESUMABLE_CHANGES = ("rounds", "early_stop", "progress")


def load_self_distill_config(
    path: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> SelfDistillConfig:
    """Read a self-distill recipe, apply `key=value` overrides, validate. Errors name the file
    and the dotted key (`recipes/x.yaml: sampling.nn: unknown key`)."""
    path = Path(path)
    raw = read_yaml_mapping(path)
    for item in overrides:
        apply_override(raw, item)
    try:
        return SelfDistillConfig.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(str(path), describe_lines(exc)) from None


def dump(config: SelfDistillConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


# ------------------------------------------------------------------------------------ scorers
def load_reward(spec: str) -> Callable[[list[dict[str, Any]], str], float]:
    """`module:function`, imported; called as fn(prompt_messages, response) -> float."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"scorer: cannot import module '{module_name}' ({exc})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"scorer: module '{module_name}' has no function '{name}'")
    return fn


def teacher_loglik_scorer(spec: str, *, batch_size: int = 16):
    """Mean per-token log-likelihood of the response (and its end-of-turn token) under the
    teacher `spec`, given the prompt: a scorer (example, response) -> float <= 0, and a close().
    One forward pass per response; with `select.min_score` in nats per token."""
    import torch

    from lmdistill.eval.likelihood import (
        as_scoring_model,
        continuation_log_probs,
        encode_text,
        gather_token_log_probs,
    )
    from lmdistill.teachers.registry import load_teacher

    teacher = load_teacher(spec, batch_size=batch_size)
    model = as_scoring_model(teacher, "the teacher_loglik scorer")

    def score(example, response: str) -> float:
        context = model.encode_chat(list(example.messages))
        tokens = [*encode_text(model, response), model.eos_ids[0]]
        with torch.no_grad():
            log_probs = continuation_log_probs(model, [context], [tokens])[0]
        return float(gather_token_log_probs(log_probs, tokens).mean())

    return score, teacher.close


def make_scorer(config: SelfDistillConfig):
    """(scorer for filter_traces or None for the task's own, close())."""
    kind, _, rest = config.scorer.partition(":")
    if kind == "reward":
        fn = load_reward(rest)
        return (lambda example, response: float(fn(list(example.messages), response))), None
    if kind == "teacher_loglik":
        return teacher_loglik_scorer(rest, batch_size=config.sampling.batch_size)
    return None, None


# ---------------------------------------------------------------------------------- the run
@dataclass
class SelfDistillResult:
    run_dir: Path
    rows: list[dict[str, Any]]  # one per finished round, round 0 first
    stopped: str | None  # why the rounds ended before `rounds`, or None
    final_model: str
    ran: list[int] = field(default_factory=list)  # rounds run by this call (the others: skipped)


def plan(config: SelfDistillConfig) -> str:
    """What a run would do, round by round, and which rounds are already done (no model loads)."""
    run_dir = Path(config.run_dir)
    s, p, e = config.sampling, config.prompts, config.eval
    threshold = (
        "no threshold" if config.select.min_score is None else f">= {config.select.min_score}"
    )
    lines = [
        f"plan: self-distill {config.model} on {config.task}, {config.rounds} round(s), in {run_dir}",
        f"  round 0: eval the start model on {e.limit or 'all'} {e.split} examples (greedy)",
    ]
    for r in range(1, config.rounds + 1):
        done = " [done]" if (run_dir / f"round_{r}" / DONE).exists() else ""
        lines.append(
            f"  round {r}:{done} sample {s.n} x {p.limit or 'all'} {p.split} prompts "
            f"(T={s.temperature}, max_tokens={s.max_tokens}) -> score ({config.scorer}) -> "
            f"select {config.select.keep} {threshold} -> sft (lr={config.train.optim.lr}, "
            f"epochs={config.train.optim.epochs}) -> eval"
        )
    if (run_dir / "round_0" / DONE).exists():
        lines[1] += " [done]"
    if config.early_stop.patience:
        lines.append(
            f"  early stop: {config.early_stop.patience} round(s) without an improvement of "
            f"{config.early_stop.min_improvement} or more"
        )
    return "\n".join(lines)


def self_distill(config: SelfDistillConfig) -> SelfDistillResult:
    """Run the rounds of `config` that are not finished yet (see the module docstring)."""
    from lmdistill.tasks.registry import get_task

    run_dir = Path(config.run_dir)
    _check_run_dir(run_dir, config)
    task = get_task(config.task)
    scorer, close_scorer = make_scorer(config)  # import errors before any model loads
    prompts_path = run_dir / "prompts.jsonl"
    _write_prompts(prompts_path, task, config.prompts, config.template)

    rows: list[dict[str, Any]] = []
    ran: list[int] = []
    model = config.model
    stopped = None
    try:
        for r in range(config.rounds + 1):
            round_dir = run_dir / f"round_{r}"
            if (round_dir / DONE).exists():
                row = json.loads((round_dir / "metrics.json").read_text())
                say(f"[round {r}] already done, skipped")
            else:
                say(f"[round {r}] running ...")
                if r == 0:
                    row = {"round": 0, "model": model}
                    row.update(_evaluate(model, task, round_dir, config))
                else:
                    row = _round(r, model, task, prompts_path, round_dir, config, scorer)
                    if "eval_score" not in row:  # nothing kept: the previous model, unchanged
                        evaluated = ("eval_score", "eval_low", "eval_high", "eval_n")
                        row.update({k: rows[-1][k] for k in evaluated})
                write_json_atomic(round_dir / "metrics.json", row)
                (round_dir / DONE).touch()
                ran.append(r)
                say(f"[round {r}] eval score {row['eval_score']:.3f}")
            rows.append(row)
            model = row["model"]
            if row.get("stopped"):
                stopped = row["stopped"]
                break
            stopped = _early_stop(rows, config.early_stop)
            if stopped:
                break
    finally:
        if close_scorer is not None:
            close_scorer()
    write_outputs(run_dir, rows, stopped, config)
    return SelfDistillResult(run_dir, rows, stopped, model, ran)


def _check_run_dir(run_dir: Path, config: SelfDistillConfig) -> None:
    """Refuse to continue a run dir made with other settings (mixed rounds would be meaningless);
    more rounds or another early stop are fine."""
    saved = run_dir / "config.yaml"
    now = config.model_dump(mode="json")
    if saved.is_file():
        before = yaml.safe_load(saved.read_text()) or {}
        changed = changed_settings(before, now, ignore=_RESUMABLE_CHANGES)
        if changed:
            raise UserError(
                f"{run_dir} holds a self-distill run with other settings ({', '.join(changed)}); "
                "use another run_dir, or the same settings to continue it"
            )
    write_text_atomic(saved, dump(config))


def _write_prompts(path: Path, task, prompts: TrainPrompts, template: str | None) -> None:
    from lmdistill.data.jsonl import write_jsonl_atomic
    from lmdistill.skills.reasoning import task_prompts

    if path.exists():  # the same every round and every rerun (a function of the config)
        return
    records = task_prompts(
        task, split=prompts.split, limit=prompts.limit, seed=prompts.seed, template=template
    )
    write_jsonl_atomic(path, records)


def _round(
    r: int,
    model: str,
    task,
    prompts_path: Path,
    round_dir: Path,
    config: SelfDistillConfig,
    scorer,
) -> dict[str, Any]:
    from lmdistill.skills.reasoning import filter_file

    row: dict[str, Any] = {"round": r}
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    _sample(model, prompts_path, round_dir / "samples.jsonl", config, seed=config.seed + r)
    seconds["sample"] = time.perf_counter() - start

    start = time.perf_counter()
    keep = "best" if config.select.keep == "best" else "all"
    stats = filter_file(
        round_dir / "samples.jsonl",
        round_dir / "kept.jsonl",
        task,
        keep=keep,
        min_score=config.select.min_score,
        dedupe=config.select.dedupe,
        scorer=scorer,
    )
    seconds["select"] = time.perf_counter() - start
    row.update(
        samples=stats.samples,
        sample_acceptance=stats.sample_acceptance,
        prompt_acceptance=stats.prompt_acceptance,
        kept=stats.kept,
    )
    say(f"[round {r}] {stats.report()}")
    if stats.kept == 0:
        # Nothing to learn from: the model stays as it was (so does its score; the caller
        # copies it), and the run ends here.
        return {**row, "model": model, "stopped": f"round {r} kept no samples", "seconds": seconds}

    start = time.perf_counter()
    row["model"], row["train_steps"], row["train_loss"] = _train(model, round_dir, config)
    seconds["train"] = time.perf_counter() - start
    row.update(_evaluate(row["model"], task, round_dir, config))
    seconds["eval"] = row.pop("seconds")["eval"]
    row["seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    return row


def _sample(
    model: str, prompts_path: Path, out: Path, config: SelfDistillConfig, seed: int
) -> None:
    from lmdistill.pipelines.generate import generate, read_prompts
    from lmdistill.teachers.base import SamplingParams
    from lmdistill.teachers.registry import load_teacher

    s = config.sampling
    params = SamplingParams(
        temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens, n=s.n, seed=seed
    )
    teacher = load_teacher(model, batch_size=s.batch_size)
    try:
        summary = generate(
            teacher, read_prompts(prompts_path), out, params, progress=config.progress
        )
    finally:
        teacher.close()
    if not summary.complete:
        raise UserError(f"{out}: {summary.failed_samples} samples failed; run again to retry them")


def _train(model: str, round_dir: Path, config: SelfDistillConfig) -> tuple[str, int, float | None]:
    """SFT of `model` on the round's kept samples; returns (model dir, steps, last loss)."""
    from lmdistill.eval.report import read_metrics
    from lmdistill.training.config import validate
    from lmdistill.training.loop import train_unless_done

    run_dir = round_dir / "train"
    final = run_dir / "final"
    t = config.train
    raw = {
        "run_dir": str(run_dir),
        "seed": config.seed,
        "precision": t.precision,
        "student": {"model": model},
        "data": {
            "path": str(round_dir / "kept.jsonl"),
            "max_length": t.max_length,
            "eval_fraction": 0.0,  # the round's evaluation is the task score on held-out data
        },
        "batch": t.batch.model_dump(mode="json"),
        "objectives": [{"kind": "sft"}],
        "optim": t.optim.model_dump(mode="json"),
        "log": {"progress": config.progress, "tensorboard": False},
    }
    train_config = validate(raw, f"{config.run_dir}: round {round_dir.name} training")
    train_unless_done(train_config)
    summary = json.loads((run_dir / "summary.json").read_text())
    losses = [r["loss"] for r in read_metrics(run_dir) if isinstance(r.get("loss"), int | float)]
    return str(final), int(summary.get("steps", 0)), (losses[-1] if losses else None)


def held_out_evaluator(task: Task, config: SelfDistillConfig) -> GenerationEval:
    """The held-out evaluation: the recipe's eval split of `task`, asked with its template (as
    the training prompts are), graded by the task's own score. Named by its `lmdistill eval`
    spec (`template:NAME:TASK` with a template), which asks the test split the same way."""
    from lmdistill.eval.generation import GenerationEval
    from lmdistill.eval.runner import TEMPLATE_PREFIX

    spec = config.task
    if config.template is not None:
        spec = f"{TEMPLATE_PREFIX}{config.template}:{config.task}"
    return GenerationEval(spec, task, template=config.template, split=config.eval.split)


def eval_settings(config: SelfDistillConfig) -> EvalSettings:
    """Greedy decoding of the recipe's held-out examples (eval.limit drawn with eval.seed)."""
    from lmdistill.eval.base import EvalSettings

    return EvalSettings(
        limit=config.eval.limit,
        max_tokens=config.eval.max_tokens or config.sampling.max_tokens,
        batch_size=config.sampling.batch_size,
        seed=config.eval.seed,
    )


def _evaluate(model: str, task: Task, round_dir: Path, config: SelfDistillConfig) -> dict[str, Any]:
    """`model` on the held-out examples through `lmdistill.eval.runner.evaluate`, cached under
    RUN_DIR/eval_cache: graded by the task's own score, never by the round's reward (the reward
    may be a proxy; the task score is what the run must improve)."""
    from lmdistill.data.jsonl import write_jsonl_atomic
    from lmdistill.eval.runner import evaluate

    start = time.perf_counter()
    results = evaluate(
        model,
        [held_out_evaluator(task, config)],
        settings=eval_settings(config),
        cache_dir=Path(config.run_dir) / EVAL_CACHE,
        measure_cost=False,
        log=None,
    )
    result = results.tasks[0].results["student"]
    score = result.metrics[result.primary]
    round_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(round_dir / "eval.jsonl", [_eval_line(r) for r in result.records])
    return {
        "model": model,
        "eval_score": score.value,
        "eval_low": score.low,
        "eval_high": score.high,
        "eval_n": score.n,
        "seconds": {"eval": round(time.perf_counter() - start, 1)},
    }


def _eval_line(record: dict[str, Any]) -> dict[str, Any]:
    """A line of a round's eval.jsonl: the example's id, the greedy response and its score."""
    responses = record["responses"]
    return {
        "id": record["id"],
        "response": responses[0] if responses else "",
        "score": record["scores"][0],
    }


def _early_stop(rows: list[dict[str, Any]], rule: EarlyStop) -> str | None:
    """Why to stop after the last row, or None: `patience` rounds in a row that did not beat the
    best earlier score by `min_improvement`."""
    if rule.patience is None:
        return None
    best = rows[0]["eval_score"]
    without = 0
    for row in rows[1:]:
        if row["eval_score"] >= best + rule.min_improvement and row["eval_score"] > best:
            without = 0
        else:
            without += 1
        best = max(best, row["eval_score"])
    if without >= rule.patience:
        return (
            f"early stop after round {rows[-1]['round']}: {without} round(s) without an "
            f"improvement of {rule.min_improvement} over {best:.3f}"
        )
    return None


# ------------------------------------------------------------------------------------ outputs
COLUMNS = (
    ("round", "round", "{}"),
    ("eval_score", "held-out score", "{:.3f}"),
    ("interval", "95% interval", "{}"),
    ("sample_acceptance", "accepted samples", "{:.1%}"),
    ("prompt_acceptance", "solved prompts", "{:.1%}"),
    ("kept", "kept", "{}"),
    ("train_steps", "train steps", "{}"),
    ("train_loss", "train loss", "{:.3f}"),
)


def rounds_table(rows: list[dict[str, Any]]) -> str:
    """The per-round metrics as a markdown table (round 0 = the start model)."""
    lines = [
        "| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            if key == "interval":
                low, high = row.get("eval_low"), row.get("eval_high")
                value = None if low is None else f"[{low:.3f}, {high:.3f}]"
            else:
                value = row.get(key)
            cells.append("-" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_rounds(rows: list[dict[str, Any]], task: str) -> bytes:
    """Held-out score per round with its interval, and the sample acceptance rate."""
    from matplotlib.figure import Figure

    from lmdistill.eval.report import figure_png  # the report's Agg canvas, without pyplot

    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    rounds = [r["round"] for r in rows]
    scores = [r["eval_score"] for r in rows]
    low = [max(0.0, r["eval_score"] - r.get("eval_low", r["eval_score"])) for r in rows]
    high = [max(0.0, r.get("eval_high", r["eval_score"]) - r["eval_score"]) for r in rows]
    ax.errorbar(rounds, scores, yerr=[low, high], fmt="o-", capsize=3, label="held-out score")
    accepted = [(r["round"], r["sample_acceptance"]) for r in rows if "sample_acceptance" in r]
    if accepted:
        ax.plot(*zip(*accepted, strict=True), "s--", label="accepted samples", alpha=0.7)
    ax.set_xticks(rounds)
    ax.set_xlabel("round (0 = start model)")
    ax.set_ylabel("score / rate")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    ax.set_title(f"Self-distillation on {task}")
    return figure_png(fig)


def write_outputs(
    run_dir: Path, rows: list[dict[str, Any]], stopped: str | None, config: SelfDistillConfig
) -> None:
    write_json_atomic(
        run_dir / "rounds.json",
        {"task": config.task, "start_model": config.model, "rows": rows, "stopped": stopped},
    )
    text = f"# Self-distillation: {config.model} on {config.task}\n\n{rounds_table(rows)}\n"
    if stopped:
        text += f"\n{stopped}\n"
    write_text_atomic(run_dir / "rounds.md", text)
    write_bytes_atomic(run_dir / "rounds.png", plot_rounds(rows, config.task))


def summary(result: SelfDistillResult) -> str:
    """A one-screen summary: the table, the best round, where things are."""
    rows = result.rows
    best = max(rows, key=lambda r: r["eval_score"] if r["eval_score"] == r["eval_score"] else -1)
    lines = [
        rounds_table(rows),
        "",
        f"start {rows[0]['eval_score']:.3f} -> last {rows[-1]['eval_score']:.3f}; "
        f"best round {best['round']} ({best['eval_score']:.3f}): {best['model']}",
    ]
    if result.stopped:
        lines.append(result.stopped)
    lines.append(f"table: {result.run_dir / 'rounds.md'}, plot: {result.run_dir / 'rounds.png'}")
    return "\n".join(lines)
