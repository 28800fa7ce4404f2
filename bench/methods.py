"""Which distillation method beats plain fine-tuning? Every method side by side, over seeds.

    .venv/bin/python bench/methods.py                        # sft, fkl, opd; 3 seeds; ~55 min
    .venv/bin/python bench/methods.py --methods all          # every method below (hours on 2 cores)
    .venv/bin/python bench/methods.py --methods sft,fkl --seeds 0,1,2,3,4 --student spread --heal-steps 0

One teacher (the bundled SmolLM2-135M-Instruct), one set of teacher data (its greedy answers to
the bundled training prompts, 252), one student initialisation (7 of the teacher's 30 layers:
by default chosen by importance and healed by 20 logit-KD steps on the teacher's text, a
"healthy start"; `--student spread --heal-steps 0` for the evenly spread, unhealed layers),
and for every method and seed a student trained for the same number of optimizer steps (SFT's:
`--epochs` over the greedy answers; on-policy distillation continues the SFT student for
`--opd-steps` more, and says so). Each student is scored on the same held-out prompts (the
bundled test split plus `prompts_extra_test.jsonl`: 262 prompts the students never saw;
teacher-relative KL and top-1 agreement on the teacher's answers, ROUGE-L of the student's greedy
answer against the teacher's) and on the verifiable task (reasoning-gym arithmetic_1digit, test
split).

Methods (`--methods`, comma-separated):
  sft       response distillation: cross-entropy on the teacher's greedy answers
  seqkd     SFT on n = 4 answers sampled from the teacher at T = 0.7 per prompt (SeqKD with
            samples), the same number of steps
  fkl       forward KL to the teacher's top-32 distribution from the offline cache, mixed 50/50
            with CE (the quickstart's KD)
  rkl       reverse KL to the online teacher's full distribution, 50/50 with CE (MiniLLM's
            direction, off-policy)
  skew_rkl  skew reverse KL (DistiLLM, s = 0.1), online teacher, 50/50 with CE, off-policy
  distillm  skew_rkl plus DistiLLM's adaptive off-policy schedule: the chance of a step on the
            student's own samples starts at 0 and rises by 0.1 whenever the held-out loss
            (evaluated every 13 steps) rose by 0.1; samples are replayed from a buffer of 32
            (DistiLLM's 1000 is ~7% of its 14k Dolly examples; 32 is ~13% of our 252)
  gkd       GKD: generalized JSD (beta 0.5), lambda 0.5 (half the steps on the student's own
            samples), online teacher
  opd       on-policy distillation: the SFT student continues with per-token reverse KL to the
            teacher on its own samples (lambda 1), `--opd-steps` steps
  opd_t07   opd with the student sampling at temperature 0.7 instead of 1 (closer to the
            greedy answers it is judged on; a weak student's T = 1 samples wander into states
            where this teacher is poor guidance)
  opd_finished  opd training only on samples that end within the token cap (DAPO's overlong
            filtering): the unfinished ones are mostly loops the teacher would continue
  opd_mix   opd on half the steps (lambda 0.5); the other half train on the teacher's answers
            with reverse KL and CE 50/50, which keeps the SFT student's ends of turn anchored
  skd       opd with a speculative proposal (SKD, arXiv:2410.11325): the student proposes each
            token and one outside the teacher's top 25 is replaced by the teacher's sample

Every (method, seed) result is cached under `--out` (a rerun skips what is done, so the bench is
resumable and can be grown with more seeds). The table reports each method minus SFT pooled over
the seeds with a two-way paired bootstrap (seeds and examples resampled;
`eval.stats.pooled_paired_difference_interval`), "better"/"worse" only when the interval
excludes 0. The last line is JSON with best_method, best_vs_sft_rouge_l (+ _low), best_vs_sft_top1,
opd_vs_sft_rouge_l, skd_vs_sft_rouge_l, best_task_retention, seeds, minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmdistill.data.jsonl import iter_jsonl, write_json_atomic, write_jsonl_atomic
from lmdistill.eval.stats import pooled_paired_difference_interval
from lmdistill.pipelines.quickstart import ASSETS, MAX_LENGTH, PROMPTS
from lmdistill.store.atomic import read_jsonl_tolerant

EXTRA_PROMPTS = ASSETS / "prompts_extra_test.jsonl"
EVERYDAY_TEST = ASSETS / "everyday_test.jsonl"
TEACHER = "smollm2-135m-instruct"
ALL_METHODS = (
    "sft",
    "seqkd",
    "fkl",
    "rkl",
    "skew_rkl",
    "distillm",
    "gkd",
    "opd",
    "opd_t07",
    "opd_finished",
    "opd_mix",
    "skd",
)
# What fits the default budget (90 minutes on 2 cores): `--methods all` runs every method.
DEFAULT_METHODS = ("sft", "fkl", "opd")
TASK = "arithmetic_1digit"
DISTILLM_REPLAY, DISTILLM_EVAL_EVERY = 32, 13


@dataclass(frozen=True)
class Bench:
    out: Path
    seeds: tuple[int, ...]
    methods: tuple[str, ...]
    epochs: float = 3.0
    lr: float = 5e-4
    layers: int = 7
    max_tokens: int = 96
    top_k: int = 32
    samples: int = 4
    sample_temperature: float = 0.7
    opd_steps: int = 25
    opd_lr: float = 1e-4
    task_limit: int = 80
    progress: bool = False
    everyday: bool = False  # also score EVERYDAY_TEST (issue #21; see everyday_scores)
    student: str = "spread"  # how the student's layers are chosen: spread | importance
    heal_steps: int = 0  # logit-KD steps on the teacher's text before any method (0: none)
    calibration: int = 8  # teacher conversations the importance ranking reads (64 tokens each)

    @property
    def tag(self) -> str:
        """The student construction's name; the default (spread, no heal) keeps the plain
        layout so earlier results stay valid."""
        name = f"{self.student}{self.layers}" + (
            f"-heal{self.heal_steps}" if self.heal_steps else ""
        )
        return "" if name == f"spread{self.layers}" else name

    def results_dir(self) -> Path:
        return self.out / "results" / self.tag if self.tag else self.out / "results"

    def runs_dir(self) -> Path:
        return self.out / "runs" / self.tag if self.tag else self.out / "runs"


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ data
def data_paths(b: Bench) -> dict[str, Path]:
    d = b.out / "data"
    return {
        "prompts": d / "prompts.jsonl",
        "greedy": d / "teacher_greedy.jsonl",
        "held_out": d / "held_out.jsonl",
        "train_prompts": d / "train_prompts.jsonl",
        "sampled": d / "teacher_sampled.jsonl",
        "cache": d / "cache",
    }


def teacher_answers(b: Bench, prompts: Path, out: Path, params) -> None:
    """The teacher's answers to `prompts` into `out` (resumable: `generate` continues a file)."""
    from lmdistill.pipelines.generate import generate, read_prompts
    from lmdistill.teachers.registry import load_teacher

    teacher = load_teacher(TEACHER, batch_size=32)
    try:
        summary = generate(teacher, read_prompts(prompts), out, params, progress=b.progress)
    finally:
        teacher.close()
    if summary.failed:
        raise RuntimeError(f"{summary.failed} prompts failed; rerun to retry them")


def data_stage(b: Bench) -> dict[str, Path]:
    """The teacher's greedy answers to every prompt, the held-out file and the top-k cache; each
    made once. (The sampled answers SeqKD needs are made only when it runs: `sampled_data`.)"""
    from lmdistill.pipelines.quickstart import QuickstartSettings, cache_stage, held_out_file
    from lmdistill.teachers import SamplingParams

    paths = data_paths(b)
    paths["prompts"].parent.mkdir(parents=True, exist_ok=True)
    if not paths["prompts"].exists():
        rows = [r for path in (PROMPTS, EXTRA_PROMPTS) for _, r in iter_jsonl(path)]
        write_jsonl_atomic(paths["train_prompts"], [r for r in rows if r["split"] == "train"])
        write_jsonl_atomic(paths["prompts"], rows)
    done = paths["prompts"].parent / "data.done"
    if done.exists():
        return paths
    say("[data] the teacher's greedy answers")
    params = SamplingParams(temperature=0.0, max_tokens=b.max_tokens)
    teacher_answers(b, paths["prompts"], paths["greedy"], params)
    held_out_file(paths["greedy"], paths["held_out"])
    say("[data] the teacher's top-k cache")
    qs = QuickstartSettings(teacher=TEACHER, kd_top_k=b.top_k, progress=b.progress)
    cache_stage(qs, paths["greedy"], paths["cache"])
    done.touch()
    return paths


def sampled_data(b: Bench, paths: dict[str, Path]) -> None:
    """n answers per training prompt sampled from the teacher (SeqKD's data)."""
    from lmdistill.teachers import SamplingParams

    done = paths["sampled"].with_suffix(".done")
    if done.exists():
        return
    say(f"[data] {b.samples} sampled teacher answers per training prompt")
    params = SamplingParams(
        temperature=b.sample_temperature, max_tokens=b.max_tokens, n=b.samples, seed=0
    )
    teacher_answers(b, paths["train_prompts"], paths["sampled"], params)
    done.touch()


def student_stage(b: Bench, paths: dict[str, Path]) -> Path:
    """The student every method starts from: the teacher's layers chosen by `b.student`
    (spread evenly, or by importance on calibration conversations), then optionally healed by
    `b.heal_steps` of logit KD on the teacher's text."""
    from lmdistill.training.students import student_from_teacher

    out = b.out / "students" / f"{b.student}{b.layers}"
    done = out.with_suffix(".done")  # config.json comes first: a crash could leave only it
    if not done.exists():
        say(f"[student] {b.student}{b.layers}")
        student_from_teacher(
            TEACHER,
            layers=b.layers,
            out_dir=out,
            selection=b.student,
            calibration=calibration_texts(b, paths),
            calibration_tokens=64,
        )
        done.touch()
    if not b.heal_steps:
        return out
    healed = b.out / "students" / f"{b.student}{b.layers}-heal{b.heal_steps}"
    raw = base_config(b, healed, out, paths["greedy"], seed=0)
    raw["objectives"] = [logits("forward_kl", alpha=1.0)]
    raw["teacher"] = {"cache": str(paths["cache"])}
    raw["optim"] = {**raw["optim"], "steps": b.heal_steps}
    say(f"[student] healing {b.student}{b.layers}: {b.heal_steps} logit-KD steps")
    final, _, _ = train_run(raw, f"heal {b.student}{b.layers}")
    return final


def calibration_texts(b: Bench, paths: dict[str, Path]) -> list[str]:
    """The first `b.calibration` training conversations (prompt + the teacher's greedy answer),
    rendered with the chat template: the text an importance ranking reads."""
    from transformers import AutoTokenizer

    from lmdistill.models import resolve_model_dir

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(TEACHER))
    texts = []
    for _, r in iter_jsonl(paths["greedy"]):
        if r.get("split", "train") == "train" and len(texts) < b.calibration:
            texts.append(tokenizer.apply_chat_template(r["messages"], tokenize=False))
    return texts


def start_scores(b: Bench, student: Path, paths: dict[str, Path]) -> dict[str, Any]:
    """The untrained student's held-out scores and calibration KL (how healthy it starts)."""

    from lmdistill.models import resolve_model_dir
    from lmdistill.training import pruning
    from lmdistill.training.students import load_model_dir, source_layers

    out = b.results_dir() / "start.json"
    if out.exists():
        return json.loads(out.read_text())
    name = b.tag or f"spread{b.layers}"
    say(f"[student] scoring the untrained student {name}")
    result = {"construction": name, **scores(b, str(student), paths)}
    teacher, tokenizer = load_model_dir(resolve_model_dir(TEACHER))
    batch = pruning.calibration_batch(tokenizer, calibration_texts(b, paths), 64)
    result["calibration_kl"] = pruning.student_kl(teacher, load_model_dir(student)[0], *batch)
    result["layers"] = source_layers(b.out / "students" / f"{b.student}{b.layers}")
    write_json_atomic(out, result)
    return result


# ------------------------------------------------------------------------------- methods
def base_config(b: Bench, run_dir: Path, student: Path, data: Path, seed: int) -> dict[str, Any]:
    """The quickstart's training settings (see pipelines/quickstart.train_config)."""
    return {
        "run_dir": str(run_dir),
        "seed": seed,
        "student": {"model": str(student)},
        "teacher": {},
        "data": {"path": str(data), "split": "train", "max_length": MAX_LENGTH},
        "batch": {"tokens_per_micro_batch": 1024, "micro_batches_per_step": 1, "packing": True},
        "objectives": [{"kind": "sft"}],
        "optim": {"lr": b.lr, "warmup_steps": 5, "epochs": b.epochs, "schedule": "cosine"},
        "eval": {"every": 0},
        "checkpoint": {"every": 0},
        "log": {"progress": b.progress, "tensorboard": False},
    }


def logits(divergence: str, alpha: float = 0.5, **extra: Any) -> dict[str, Any]:
    return {"kind": "logits", "divergence": divergence, "alpha": alpha, **extra}


def method_config(
    b: Bench, method: str, seed: int, paths: dict[str, Path], student: Path, sft_steps: int
) -> dict[str, Any]:
    run_dir = b.runs_dir() / method / f"seed{seed}"
    raw = base_config(b, run_dir, student, paths["greedy"], seed)
    online = {"model": TEACHER}
    if method == "sft":
        return raw
    raw["optim"] = {**raw["optim"], "steps": sft_steps}
    if method == "seqkd":
        raw["data"]["path"] = str(paths["sampled"])
    elif method == "fkl":
        raw["objectives"] = [logits("forward_kl")]
        raw["teacher"] = {"cache": str(paths["cache"])}
    elif method == "rkl":
        raw["objectives"] = [logits("reverse_kl")]
        raw["teacher"] = online
    elif method in ("skew_rkl", "distillm"):
        raw["objectives"] = [logits("skew_reverse_kl", skew=0.1)]
        raw["teacher"] = online
        if method == "distillm":
            raw["on_policy"] = {
                "lambda": 0.0,
                "adaptive": True,
                "adaptive_margin": 0.1,
                "replay": DISTILLM_REPLAY,
                "max_new_tokens": b.max_tokens,
            }
            raw["eval"] = {"every": DISTILLM_EVAL_EVERY}
    elif method == "gkd":
        raw["objectives"] = [logits("jsd", beta=0.5)]
        raw["teacher"] = online
        raw["on_policy"] = {"lambda": 0.5, "max_new_tokens": b.max_tokens}
    elif method in ("opd", "opd_t07", "opd_finished", "opd_mix", "skd"):
        raw["student"] = {"model": str(b.runs_dir() / "sft" / f"seed{seed}" / "final")}
        mix = method == "opd_mix"
        raw["objectives"] = [logits("reverse_kl", alpha=0.5 if mix else 1.0)]
        raw["teacher"] = online
        raw["on_policy"] = {"lambda": 0.5 if mix else 1.0, "max_new_tokens": b.max_tokens}
        if method == "skd":
            raw["on_policy"].update(proposal="speculative", teacher_top_k=25)
        if method == "opd_t07":
            raw["on_policy"].update(temperature=0.7)
        if method == "opd_finished":
            raw["on_policy"].update(drop_unfinished=True)
        raw["optim"] = {"lr": b.opd_lr, "warmup_steps": 0, "steps": b.opd_steps}
    else:
        raise SystemExit(f"unknown method {method!r}; known: {', '.join(ALL_METHODS)}")
    return raw


def train_run(raw: dict[str, Any], name: str) -> tuple[Path, float, int]:
    """Train unless done; (final dir, training seconds, optimizer steps)."""
    from lmdistill.training.config import validate
    from lmdistill.training.loop import train_unless_done

    run_dir = Path(raw["run_dir"])
    timing = run_dir / "bench-train.json"
    if not timing.exists():
        start = time.perf_counter()
        train_unless_done(validate(raw, name))
        steps = sum(1 for _, r in read_jsonl_tolerant(run_dir / "metrics.jsonl") if "loss" in r)
        write_json_atomic(timing, {"seconds": time.perf_counter() - start, "steps": steps})
    t = json.loads(timing.read_text())
    return run_dir / "final", t["seconds"], t["steps"]


# ---------------------------------------------------------------------------------- eval
def scores(b: Bench, model: str, paths: dict[str, Path]) -> dict[str, Any]:
    """Per-example held-out records (rouge_l, agree, kl, tokens) and task scores of `model`,
    in a fixed example order; evaluate() caches every (model, task) under out/eval-cache."""
    from lmdistill.eval.base import EvalSettings
    from lmdistill.eval.runner import evaluate

    cache = b.out / "eval-cache"
    common = dict(teacher=TEACHER, cache_dir=cache, measure_cost=False, log=None)
    rel = evaluate(
        model,
        [f"rel-jsonl:{paths['held_out']}"],
        settings=EvalSettings(max_tokens=b.max_tokens, batch_size=16),
        **common,
    )
    task = evaluate(
        model,
        [TASK],
        settings=EvalSettings(limit=b.task_limit, max_tokens=b.max_tokens, batch_size=16),
        **common,
    )
    records = sorted(rel.tasks[0].results["student"].records, key=lambda r: str(r["id"]))
    t = task.tasks[0]
    return {
        "ids": [str(r["id"]) for r in records],
        "rouge_l": [float(r["rouge_l"]) for r in records],
        "agree": [float(r["agree"]) for r in records],
        "kl": [float(r["kl"]) for r in records],
        "tokens": [float(r["tokens"]) for r in records],
        "task_scores": dict(
            zip(t.results["student"].example_ids, t.results["student"].per_example, strict=True)
        ),
        "teacher_task": t.results["teacher"].metrics[t.primary].value,
    }


def method_result(b: Bench, method: str, seed: int, paths, student, sft_steps) -> dict[str, Any]:
    out = b.results_dir() / f"{method}-seed{seed}.json"
    if out.exists():
        return json.loads(out.read_text())
    if method == "seqkd":
        sampled_data(b, paths)
    say(f"[{method} seed {seed}] training ...")
    raw = method_config(b, method, seed, paths, student, sft_steps)
    final, seconds, steps = train_run(raw, f"bench {method} seed {seed}")
    say(f"[{method} seed {seed}] trained in {seconds:.0f}s ({steps} steps); evaluating ...")
    result = {"method": method, "seed": seed, "train_seconds": seconds, "steps": steps}
    result.update(scores(b, str(final), paths))
    write_json_atomic(out, result)
    return result


# ------------------------------------------ issue #21: the everyday held-out set, beside the rest
def everyday_scores(b: Bench, model: str) -> dict[str, Any]:
    """Per-example records of `model` on the everyday held-out requests (the teacher's greedy
    answers made by evaluate(), cached under out/eval-cache), shaped like `scores`' records."""
    from lmdistill.eval.base import EvalSettings
    from lmdistill.eval.runner import evaluate

    rel = evaluate(
        model,
        [f"rel-jsonl:{EVERYDAY_TEST}"],
        teacher=TEACHER,
        settings=EvalSettings(max_tokens=b.max_tokens, batch_size=16),
        cache_dir=b.out / "eval-cache",
        measure_cost=False,
        log=None,
    )
    records = sorted(rel.tasks[0].results["student"].records, key=lambda r: str(r["id"]))
    out: dict[str, Any] = {"ids": [str(r["id"]) for r in records]}
    for field in ("rouge_l", "agree", "kl", "tokens"):
        out[field] = [float(r[field]) for r in records]
    return out


def with_everyday(b: Bench, result: dict[str, Any]) -> dict[str, Any]:
    """`result` with its `everyday` scores, computed once and saved beside the others."""
    if not b.everyday or "everyday" in result:
        return result
    method, seed = result["method"], result["seed"]
    final = b.runs_dir() / method / f"seed{seed}" / "final"
    result = {**result, "everyday": everyday_scores(b, str(final))}
    write_json_atomic(b.results_dir() / f"{method}-seed{seed}.json", result)
    return result


def everyday_rows(results: dict[str, dict[int, dict]]) -> str:
    """ROUGE-L on the everyday held-out set per method, and minus SFT pooled over the seeds."""
    sft = results.get("sft", {})
    lines = ["| method | everyday ROUGE-L | everyday ROUGE-L − SFT |", "|---|---|---|"]
    for method, by_seed in results.items():
        runs = [r["everyday"] for r in by_seed.values() if "everyday" in r]
        if not runs:
            continue
        mean = float(np.mean([np.mean(r["rouge_l"]) for r in runs]))
        seeds = [s for s in by_seed if s in sft and "everyday" in sft[s]]
        diff = "–"
        if method != "sft" and seeds:
            d = vs_sft(
                [by_seed[s]["everyday"] for s in seeds],
                [sft[s]["everyday"] for s in seeds],
                "rouge_l",
            )
            diff = f"{d.value:+.3f} [{d.low:+.3f}, {d.high:+.3f}] {d.verdict}"
        lines.append(f"| {method} | {mean:.3f} | {diff} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- summary
@dataclass(frozen=True)
class Diff:
    value: float
    low: float
    high: float
    higher_is_better: bool

    @property
    def verdict(self) -> str:
        if self.low > 0 or self.high < 0:
            return "better" if (self.low > 0) == self.higher_is_better else "worse"
        return "tie"

    def __str__(self) -> str:
        return f"{self.value:+.3f} [{self.low:+.3f}, {self.high:+.3f}] {self.verdict}"


METRICS: dict[str, tuple[str, bool, bool]] = {
    # name: (record field, per-token ratio?, higher is better)
    "rouge_l": ("rouge_l", False, True),
    "top1": ("agree", True, True),
    "kl": ("kl", True, False),
}


def matrix(results: list[dict[str, Any]], field: str, ids: list[str]) -> np.ndarray:
    rows = []
    for r in results:
        by_id = dict(zip(r["ids"], r[field], strict=True))
        rows.append([by_id[i] for i in ids])
    return np.asarray(rows)


def vs_sft(method_runs: list[dict], sft_runs: list[dict], metric: str) -> Diff:
    """Method minus SFT over the seeds both have, paired by seed and example."""
    field, per_token, higher = METRICS[metric]
    ids = sorted(set(method_runs[0]["ids"]) & set(sft_runs[0]["ids"]))
    a, b = matrix(method_runs, field, ids), matrix(sft_runs, field, ids)
    tokens = matrix(method_runs, "tokens", ids) if per_token else None
    i = pooled_paired_difference_interval(a, b, a_tokens=tokens, b_tokens=tokens)
    return Diff(i.estimate, i.low, i.high, higher)


def task_matrix(runs: list[dict]) -> tuple[np.ndarray, list[str]]:
    ids = sorted(set.intersection(*(set(r["task_scores"]) for r in runs)))
    return np.asarray([[r["task_scores"][i] for i in ids] for r in runs]), ids


def summarize(b: Bench, results: dict[str, dict[int, dict]], minutes: float) -> dict[str, Any]:
    seeds_of = {m: sorted(r) for m, r in results.items()}
    sft = results.get("sft", {})
    rows = []
    for method, by_seed in results.items():
        seeds = [s for s in seeds_of[method] if s in sft]
        runs = [by_seed[s] for s in seeds_of[method]]
        row: dict[str, Any] = {"method": method, "seeds": seeds_of[method]}
        row["steps"] = float(np.mean([r["steps"] for r in runs]))
        row["train_minutes"] = float(np.mean([r["train_seconds"] for r in runs])) / 60
        for metric, (field, per_token, _) in METRICS.items():
            vals = [np.asarray(r[field]) for r in runs]
            tok = [np.asarray(r["tokens"]) for r in runs]
            row[metric] = float(
                np.mean(
                    [
                        (v.sum() / t.sum()) if per_token else v.mean()
                        for v, t in zip(vals, tok, strict=True)
                    ]
                )
            )
        scores_, _ = task_matrix(runs)
        row["task"] = float(scores_.mean())
        row["task_retention"] = row["task"] / runs[0]["teacher_task"]
        if method != "sft" and seeds:
            row["vs_sft"] = {}
            for m in METRICS:
                d = vs_sft([by_seed[s] for s in seeds], [sft[s] for s in seeds], m)
                row["vs_sft"][m] = {**d.__dict__, "verdict": d.verdict}
        rows.append(row)
    return {"rows": rows, "minutes": minutes, "teacher_task": _teacher_task(results)}


def _teacher_task(results: dict[str, dict[int, dict]]) -> float | None:
    for by_seed in results.values():
        for r in by_seed.values():
            return float(r["teacher_task"])
    return None


def start_summary(start: dict[str, Any]) -> dict[str, Any]:
    """The untrained student's figures: construction, layers, calibration KL and held-out
    ROUGE-L, top-1 and KL (per token, as in the table)."""
    tokens = np.asarray(start["tokens"])
    return {
        "construction": start["construction"],
        "layers": start.get("layers"),
        "calibration_kl": start.get("calibration_kl"),
        "rouge_l": float(np.mean(start["rouge_l"])),
        "top1": float(np.sum(start["agree"]) / tokens.sum()),
        "kl": float(np.sum(start["kl"]) / tokens.sum()),
    }


def markdown(summary: dict[str, Any]) -> str:
    start = summary.get("start")
    intro = (
        f"Student: {start['construction']} (teacher layers {start['layers']}); untrained, it "
        f"starts at held-out KL {start['kl']:.2f} nats/token, top-1 {start['top1']:.3f}, "
        f"ROUGE-L {start['rouge_l']:.3f} (calibration KL {start['calibration_kl']:.2f}).\n\n"
        if start
        else ""
    )
    head = intro + (
        "| method | seeds | steps | train min | ROUGE-L | top-1 | KL | "
        f"{TASK} (retention) | ROUGE-L − SFT | top-1 − SFT | KL − SFT |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in summary["rows"]:
        d = r.get("vs_sft")

        def fmt(m: str, d=d) -> str:
            if not d:
                return "–"
            x = d[m]
            v = f"{x['value']:+.3f} [{x['low']:+.3f}, {x['high']:+.3f}]"
            return f"**{v}** {x['verdict']}" if x["verdict"] != "tie" else f"{v} tie"

        lines.append(
            f"| {r['method']} | {len(r['seeds'])} | {r['steps']:.0f} | {r['train_minutes']:.1f} | "
            f"{r['rouge_l']:.3f} | {r['top1']:.3f} | {r['kl']:.2f} | "
            f"{r['task']:.3f} ({r['task_retention']:.2f}) | {fmt('rouge_l')} | {fmt('top1')} | "
            f"{fmt('kl')} |"
        )
    return head + "\n".join(lines) + "\n"


def headline(summary: dict[str, Any], seeds: tuple[int, ...]) -> dict[str, Any]:
    """The JSON line: the best method by its ROUGE-L interval's lower bound against SFT."""
    rows = [r for r in summary["rows"] if "vs_sft" in r]
    by = {r["method"]: r for r in summary["rows"]}
    best = max(rows, key=lambda r: r["vs_sft"]["rouge_l"]["low"], default=None)

    def rouge_vs_sft(method: str) -> float | None:
        value = by.get(method, {}).get("vs_sft", {}).get("rouge_l", {}).get("value")
        return round(value, 4) if value is not None else None

    return {
        "best_method": best["method"] if best else None,
        "best_vs_sft_rouge_l": round(best["vs_sft"]["rouge_l"]["value"], 4) if best else None,
        "best_vs_sft_rouge_l_low": round(best["vs_sft"]["rouge_l"]["low"], 4) if best else None,
        "best_vs_sft_top1": round(best["vs_sft"]["top1"]["value"], 4) if best else None,
        "opd_vs_sft_rouge_l": rouge_vs_sft("opd"),
        "skd_vs_sft_rouge_l": rouge_vs_sft("skd"),
        "best_task_retention": round(max(r["task_retention"] for r in summary["rows"]), 3),
        "seeds": len(seeds),
        "minutes": round(summary["minutes"], 1),
    }


# ---------------------------------------------------------------------------------- main
def run(b: Bench, *, before: Callable[[str, int], None] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    paths = data_stage(b)
    student = student_stage(b, paths)
    start = start_scores(b, student, paths)
    # SFT first (the others take its step count, and opd starts from its student), then one
    # method at a time over every seed, so a bench stopped early has whole methods to compare.
    order = ["sft", *[m for m in b.methods if m != "sft"]]
    results: dict[str, dict[int, dict]] = {}
    for method in order:
        for seed in b.seeds:
            sft_steps = results["sft"][seed]["steps"] if method != "sft" else 0
            results.setdefault(method, {})[seed] = with_everyday(
                b, method_result(b, method, seed, paths, student, sft_steps)
            )
    summary = summarize(b, results, (time.perf_counter() - started) / 60)
    summary["start"] = start_summary(start)
    if b.everyday:
        summary["everyday_md"] = everyday_rows(results)
    suffix = f"-{b.tag}" if b.tag else ""
    (b.out / f"methods{suffix}.md").write_text(markdown(summary) + summary.get("everyday_md", ""))
    write_json_atomic(b.out / f"methods{suffix}.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/bench-methods"))
    p.add_argument("--seeds", default="0,1,2", help="training seeds (default 0,1,2)")
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated, or 'all' (default {','.join(DEFAULT_METHODS)}: what fits 90 "
        "minutes on 2 cores)",
    )
    p.add_argument(
        "--epochs", type=float, default=3.0, help="SFT epochs; sets every method's steps"
    )
    p.add_argument("--layers", type=int, default=7, help="teacher layers the student keeps")
    p.add_argument("--opd-steps", type=int, default=25, help="on-policy steps after SFT")
    p.add_argument(
        "--student",
        choices=("spread", "importance"),
        default="importance",
        help="how the student keeps --layers of the teacher's: spread evenly, or by importance "
        "(iterative removal by KL on calibration conversations, Minitron-style)",
    )
    p.add_argument(
        "--heal-steps",
        type=int,
        default=20,
        help="logit-KD steps on the teacher's text first (default 20; 0: none)",
    )
    p.add_argument("--progress", action="store_true", help="progress bars")
    p.add_argument(
        "--everyday",
        action="store_true",
        help="also score lmdistill/assets/everyday_test.jsonl (everyday requests, issue #21)",
    )
    a = p.parse_args(argv)
    methods = ALL_METHODS if a.methods == "all" else tuple(m for m in a.methods.split(",") if m)
    unknown = sorted(set(methods) - set(ALL_METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; known: {', '.join(ALL_METHODS)}")
    b = Bench(
        out=a.out,
        seeds=tuple(int(s) for s in a.seeds.split(",")),
        methods=methods,
        epochs=a.epochs,
        layers=a.layers,
        opd_steps=a.opd_steps,
        progress=a.progress,
        everyday=a.everyday,
        student=a.student,
        heal_steps=a.heal_steps,
    )
    summary = run(b)
    print(markdown(summary) + summary.get("everyday_md", ""))
    print(json.dumps(headline(summary, b.seeds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
