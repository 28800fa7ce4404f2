"""The quickstart: distill the bundled teacher into a student with 7 of its 30 layers (a quarter
of its non-embedding parameters, 2.5x fewer in all), offline, on CPU, and report what the student
kept.

Stages (each resumable: rerunning skips finished work):
  1. responses   the teacher answers the bundled prompts (greedy), train and held-out splits,
                 and everyday requests it synthesized itself (`lmdistill prompts synthesize`):
                 some to train on, and a held-out set kept apart from everything trained on
  2. student     a student built from 7 of the teacher's 30 layers (same tokenizer, DistilBERT /
                 Minitron-style initialisation)
  3. cache       the teacher's top-32 log-probs for every response token (offline cache)
  4. sft         response distillation: the student fine-tuned on the teacher's answers
  5. kd          response + logit distillation: the same data, plus forward KL to the teacher's
                 top-32 next-token distribution from the cache (the fused sparse loss; no teacher
                 is loaded while training). sft and kd train side by side, each in its own
                 `lmdistill train` process with half the cores (`train_side_by_side`)
  6. eval        teacher, KD student, SFT-only student and the untrained student on both
                 held-out sets (the templated one and the everyday one), side by side:
                 teacher-relative agreement/KL, ROUGE-L against the teacher's answers, and
                 a verifiable arithmetic task; cost (size, speed, memory)
  7. report      report.md / report.html / report.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmdistill.errors import UserError, say
from lmdistill.store.atomic import write_text_atomic
from lmdistill.store.settings import changed_settings

ASSETS = Path(__file__).resolve().parents[1] / "assets"
MAX_LENGTH = 384  # tokens per training example (prompt + response)
PROMPTS = ASSETS / "prompts.jsonl"
# Everyday requests the bundled teacher synthesized (scripts/make_everyday_prompts.py).
EVERYDAY_TRAIN = ASSETS / "everyday_train.jsonl"
EVERYDAY_TEST = ASSETS / "everyday_test.jsonl"
EVERYDAY = "everyday"  # the `set` field that marks them in the responses file


@dataclass(frozen=True)
class QuickstartSettings:
    out_dir: Path = Path("runs/quickstart")
    teacher: str = "smollm2-135m-instruct"
    student_layers: int = 7  # 7 of 30: ~1/4 of the teacher's non-embedding parameters
    student_intermediate: int | None = None  # a narrower MLP (channels kept by norm); None: same
    max_tokens: int = 96  # per teacher response
    epochs: float = 3.0
    lr: float = 5e-4
    kd_alpha: float = 0.5  # KD objective: 0.5 * T^2 * KL + 0.5 * CE
    kd_temperature: float = 1.0
    # KD from an offline top-k cache (no teacher in training; measured when it was chosen, at
    # e0cae79 on 2026-11-28: 2.2x faster steps than the online teacher, and ROUGE-L 0.263 vs 0.234
    # on the held-out prompts; the README has the current figures); None: online.
    kd_top_k: int | None = 32
    eval_tasks: tuple[str, ...] = ("arithmetic_1digit",)
    eval_limit: int = 80  # examples per task (the held-out prompts number 88)
    prompts: Path = PROMPTS  # JSONL with "prompt" and "split" ("train" / "test")
    # The first N of each everyday file (48 and 39 ship). 32 of each fits the 15-minute budget on
    # 2 cores (measured 2026-12-03, fresh clone of 85b2b7b: the job 13 min 9 s, eval 240 s of it,
    # plus 2 min 7 s of install; see the README). recipes/quickstart_large.yaml synthesizes 600.
    everyday_train: Path = EVERYDAY_TRAIN
    everyday_train_limit: int = 32
    everyday_test: Path = EVERYDAY_TEST
    everyday_test_limit: int = 32
    measure_cost: bool = True
    cost_rounds: int = 2  # interleaved timing rounds (`lmdistill eval` does 5): 2 fit the budget
    progress: bool = True
    seed: int = 0  # training seed of both students (the README's seed table reruns 0, 1, 2)


@dataclass
class StageLog:
    """What ran, what was skipped, and how long each stage took."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def run(self, name: str, work: Callable[[], Any], done_marker: Path | None = None) -> Any:
        """Run `work` unless `done_marker` exists; write the marker when it finishes. Without a
        marker the stage always runs (cheap stages, or ones with their own cache)."""
        if done_marker is not None and done_marker.exists():
            self.rows.append({"stage": name, "status": "skipped (done)", "seconds": 0.0})
            say(f"[{name}] already done, skipped")
            return None
        say(f"[{name}] running ...")
        start = time.perf_counter()
        out = work()
        seconds = time.perf_counter() - start
        if done_marker is not None:
            _mark(done_marker)
        self.rows.append({"stage": name, "status": "ran", "seconds": round(seconds, 1)})
        say(f"[{name}] done in {seconds:.1f}s")
        return out

    def add(self, name: str, status: str, seconds: float) -> None:
        self.rows.append({"stage": name, "status": status, "seconds": round(seconds, 1)})

    def summary(self) -> str:
        lines = [f"  {r['stage']:<10} {r['status']:<16} {r['seconds']:>7.1f}s" for r in self.rows]
        return "\n".join(lines)


def _mark(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def teacher_responses(s: QuickstartSettings, out: Path) -> None:
    """Greedy teacher answers to every bundled prompt; the `split` field is carried through."""
    from lmdistill.pipelines.generate import generate
    from lmdistill.teachers import SamplingParams
    from lmdistill.teachers.registry import load_teacher

    teacher = load_teacher(s.teacher, batch_size=32)
    try:
        summary = generate(
            teacher,
            quickstart_prompts(s),
            out,
            SamplingParams(temperature=0.0, max_tokens=s.max_tokens),
            cache=None,
            progress=s.progress,
        )
    finally:
        teacher.close()
    if summary.failed:
        raise RuntimeError(f"{summary.failed} prompts failed; rerun to retry them")


def quickstart_prompts(s: QuickstartSettings) -> list:
    """The bundled prompts, then the first `everyday_train_limit` everyday training requests and
    the first `everyday_test_limit` everyday held-out ones, marked `set: everyday`."""
    import dataclasses

    from lmdistill.pipelines.generate import read_prompts

    prompts = read_prompts(s.prompts)
    for path, limit in (
        (s.everyday_train, s.everyday_train_limit),
        (s.everyday_test, s.everyday_test_limit),
    ):
        if limit > 0:
            prompts += [
                dataclasses.replace(p, fields={**p.fields, "set": EVERYDAY})
                for p in read_prompts(path)[:limit]
            ]
    return prompts


def held_out_file(responses: Path, out: Path, which: str | None = None) -> None:
    """The responses to prompts marked split 'test' (never trained on): the reference of the
    teacher-relative metrics. `which`: only those of that `set` ("everyday"), or ("bundled")
    those of none. Written atomically."""
    from lmdistill.data.jsonl import iter_jsonl, write_jsonl_atomic

    def keep(r: dict[str, Any]) -> bool:
        if r.get("split") != "test":
            return False
        return which is None or r.get("set", "bundled") == which

    write_jsonl_atomic(out, (r for _, r in iter_jsonl(responses) if keep(r)))


def train_config(s: QuickstartSettings, run_dir: Path, student: Path, data: Path, kind: str):
    from lmdistill.training.config import validate

    objectives: list[dict[str, Any]] = [{"kind": "sft"}]
    teacher: dict[str, Any] = {}
    if kind == "kd":
        objectives = [
            {
                "kind": "logits",
                "divergence": "forward_kl",
                "temperature": s.kd_temperature,
                "alpha": s.kd_alpha,
            }
        ]
        teacher = {"model": s.teacher} if s.kd_top_k is None else {"cache": str(cache_dir(run_dir))}
    raw = {
        "run_dir": str(run_dir),
        "seed": s.seed,
        "student": {"model": str(student)},
        "teacher": teacher,
        "data": {
            "path": str(data),
            "split": "train",
            "max_length": MAX_LENGTH,
            "eval_fraction": 0.05,
        },
        "batch": {"tokens_per_micro_batch": 1024, "micro_batches_per_step": 1, "packing": True},
        "objectives": objectives,
        "optim": {"lr": s.lr, "warmup_steps": 5, "epochs": s.epochs, "schedule": "cosine"},
        "eval": {"every": 0},
        "checkpoint": {"every": 10, "keep": 1},
        "log": {"progress": s.progress, "tensorboard": False},
    }
    return validate(raw, f"quickstart ({kind})")


def train_side_by_side(configs: Mapping[str, Any], log: StageLog, *, progress: bool) -> None:
    """Train every run of `configs` (name -> TrainConfig) that is not trained yet, all at once,
    each in its own `lmdistill train` process with an equal share of the cores; each resumes
    from its latest checkpoint. A small student's matmuls keep two threads only partly busy, so
    two runs with one thread each finish sooner than the same runs one after the other with two
    (measured 2026-12-03 on 2 cores, 20 steps each of the quickstart's SFT and KD runs: 70 s side
    by side, 108 s in turn). Each process writes RUN_DIR.log; a run that fails raises a UserError
    naming it and its last line, after the others finish."""
    from lmdistill.training.config import dump
    from lmdistill.training.loop import is_trained, latest_checkpoint

    todo = {name: c for name, c in configs.items() if not is_trained(c.run_dir)}
    for name in configs.keys() - todo.keys():
        log.add(name, "skipped (done)", 0.0)
        say(f"[{name}] already done, skipped")
    if not todo:
        return
    threads = str(max(1, (os.cpu_count() or 1) // len(todo)))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    started = time.perf_counter()
    running: dict[str, tuple[subprocess.Popen, Path]] = {}
    say(f"[{' + '.join(todo)}] training side by side, {threads} thread(s) each ...")
    try:
        for name, config in todo.items():
            run_dir = Path(config.run_dir)
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            recipe = run_dir.parent / f"{run_dir.name}.recipe.yaml"
            write_text_atomic(recipe, dump(config))
            command = [sys.executable, "-m", "lmdistill", "train", str(recipe)]
            if latest_checkpoint(run_dir) is not None:
                command.append("--resume")
            command.append("log.progress=false")
            log_path = run_dir.parent / f"{run_dir.name}.log"
            with log_path.open("w") as out:
                process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
            running[name] = (process, log_path)
        _follow(todo, running, started, log, progress)
    finally:
        for process, _ in running.values():
            if process.poll() is None:
                process.terminate()
                process.wait()
    failed = [(name, path) for name, (process, path) in running.items() if process.returncode]
    if failed:
        name, path = failed[0]
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        last = lines[-1] if lines else "no output"
        raise UserError(f"training {name} failed: {last} (full log: {path})")


def _follow(
    configs: Mapping[str, Any],
    running: Mapping[str, tuple[subprocess.Popen, Path]],
    started: float,
    log: StageLog,
    progress: bool,
) -> None:
    """Wait for the processes, a progress bar over every run's optimizer steps (read from their
    metrics.jsonl), and log each run's wall time when it ends."""
    from tqdm.auto import tqdm

    from lmdistill.store.atomic import read_jsonl_tolerant

    def steps(config) -> tuple[int, int | None]:
        done, total = 0, None
        for _, record in read_jsonl_tolerant(Path(config.run_dir) / "metrics.jsonl"):
            if "info" in record:
                total = record["info"].get("total_steps")
            elif "loss" in record:
                done = max(done, int(record["step"]))
        return done, total

    bar = tqdm(total=None, unit="step", desc=" + ".join(configs), disable=not progress)
    finished: set[str] = set()
    try:
        while len(finished) < len(running):
            time.sleep(1.0)
            counts = [steps(c) for c in configs.values()]
            if all(total is not None for _, total in counts):
                bar.total = sum(int(total) for _, total in counts)
            bar.n = sum(done for done, _ in counts)
            bar.refresh()
            for name, (process, _) in running.items():
                if name not in finished and process.poll() is not None:
                    finished.add(name)
                    seconds = time.perf_counter() - started
                    status = "ran" if process.returncode == 0 else "failed"
                    log.add(name, status, seconds)
                    line = f"[{name}] {'done' if status == 'ran' else 'FAILED'} in {seconds:.1f}s"
                    bar.write(line, file=sys.stderr)  # on its own line, above the bar
    finally:
        bar.close()


def cache_dir(kd_run_dir: Path) -> Path:
    """Where the KD run's offline teacher cache lives (next to the run)."""
    return kd_run_dir.parent / "teacher-cache"


def cache_stage(s: QuickstartSettings, data: Path, out: Path) -> None:
    """The teacher's top-k log-probs on the training data (the data's train split is all that
    training reads; held-out records are cached too, they are few, and never trained on)."""
    from lmdistill.teachers.cache import build_cache
    from lmdistill.teachers.registry import load_teacher

    teacher = load_teacher(s.teacher)
    try:
        build_cache(
            teacher, data, out, top_k=s.kd_top_k, max_length=MAX_LENGTH, progress=s.progress
        )
    finally:
        teacher.close()


def verdicts(results) -> str:
    """One line per comparison of the KD student with another model (`eval.compare`); the
    held-out prompts' task is called `held-out`."""
    from lmdistill.eval.compare import compare

    def short(task: str) -> str:
        if task.startswith("rel-jsonl:"):
            return "everyday held-out" if EVERYDAY in Path(task).name else "held-out"
        return task

    return "\n".join(
        f"  vs {c.other:<10} {short(c.task):<18} {c.metric:<15} {c.difference.value:+.3f} "
        f"[{c.difference.low:+.3f}, {c.difference.high:+.3f}]  {c.verdict}"
        for c in compare(results)
    )


@dataclass(frozen=True)
class QuickstartResult:
    report_dir: Path
    stages: list[dict[str, Any]]  # stage, status ("ran" / "skipped (done)"), seconds


# Settings that only change how a run is shown or measured, not what it makes.
PRESENTATION = ("progress", "measure_cost", "cost_rounds", "eval_limit", "eval_tasks")


def check_student(s: QuickstartSettings) -> None:
    """The student the settings ask for fits the teacher (`student_from_teacher`'s own rules, on
    the teacher's config alone: no weights loaded)."""
    from lmdistill.training.students import model_shape, student_problems

    problems = student_problems(
        model_shape(s.teacher), layers=s.student_layers, intermediate_size=s.student_intermediate
    )
    if problems:
        flags = {"layers": "--layers", "intermediate_size": "student_intermediate"}
        raise UserError("; ".join(f"{flags.get(k, k)}: {v}" for k, v in problems.items()))


def check_settings(s: QuickstartSettings, path: Path) -> None:
    """Refuse to reuse an output dir made with other settings: its stages are skipped on their
    done-markers, so `--layers 5` or `--seed 1` over a default run would report the old models."""
    if not path.exists():
        return
    old = json.loads(path.read_text())
    new = json.loads(json.dumps(asdict(s), default=str))
    # Only today's settings count: one an older version saved and this one dropped is no change.
    changed = changed_settings({k: old.get(k) for k in new}, new, ignore=PRESENTATION)
    if changed:
        raise UserError(
            f"{path.parent} was made with other settings ({', '.join(changed)} differ); "
            "pass another --out, or delete that dir to start over"
        )


def quickstart(s: QuickstartSettings = QuickstartSettings()) -> QuickstartResult:
    """Run every stage that is not done yet; returns where the report is and what ran."""
    from lmdistill.eval.base import EvalSettings
    from lmdistill.eval.report import write_report
    from lmdistill.eval.runner import evaluate
    from lmdistill.training.students import student_from_teacher

    start = time.perf_counter()
    out = Path(s.out_dir)
    check_student(s)  # before anything runs: a bad --layers is found in a second, not minutes
    out.mkdir(parents=True, exist_ok=True)
    check_settings(s, out / "settings.json")
    write_text_atomic(out / "settings.json", json.dumps(asdict(s), indent=2, default=str))
    log = StageLog()
    responses = out / "data" / "teacher_responses.jsonl"
    held_out = out / "data" / "held_out.jsonl"
    held_out_everyday = out / "data" / "held_out_everyday.jsonl"
    untrained = out / "students" / "untrained"
    runs = {kind: out / "runs" / kind for kind in ("sft", "kd")}

    def responses_stage() -> None:
        teacher_responses(s, responses)
        held_out_file(responses, held_out, "bundled")
        if s.everyday_test_limit > 0:
            held_out_file(responses, held_out_everyday, EVERYDAY)

    log.run("responses", responses_stage, out / "data" / "responses.done")
    log.run(
        "student",
        lambda: student_from_teacher(
            s.teacher,
            layers=s.student_layers,
            intermediate_size=s.student_intermediate,
            out_dir=untrained,
        ),
        untrained / "student.done",
    )
    if s.kd_top_k is not None:
        cache = cache_dir(runs["kd"])
        log.run("cache", lambda: cache_stage(s, responses, cache), cache.parent / "cache.done")
    configs = {
        kind: train_config(s, run_dir, untrained, responses, kind) for kind, run_dir in runs.items()
    }
    train_side_by_side(configs, log, progress=s.progress)
    report_dir = out / "report"
    # Evaluation always runs: evaluate() caches per (model, task, settings), so a rerun is cheap.
    results = log.run(
        "eval",
        lambda: evaluate(
            str(runs["kd"] / "final"),
            [
                f"rel-jsonl:{held_out}",
                *([f"rel-jsonl:{held_out_everyday}"] if s.everyday_test_limit > 0 else []),
                *s.eval_tasks,
            ],
            teacher=s.teacher,
            extra={"sft-only": str(runs["sft"] / "final"), "untrained": str(untrained)},
            settings=EvalSettings(limit=s.eval_limit, max_tokens=s.max_tokens, batch_size=16),
            cache_dir=out / "eval-cache",
            measure_cost=s.measure_cost,
            cost_rounds=s.cost_rounds,
            run_dir=runs["kd"],
        ),
    )
    log.run("report", lambda: write_report(results, report_dir))
    say("\nthe KD student against the others (paired, 95% interval):\n" + verdicts(results))
    say("\nstages:\n" + log.summary())
    say(f"total {time.perf_counter() - start:.1f}s; report: {report_dir / 'report.md'}")
    return QuickstartResult(report_dir, log.rows)
