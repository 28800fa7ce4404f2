"""What does the compact teacher cache cost in student quality? (issue #20, item 3)

    .venv/bin/python bench/cache_quality.py                      # seeds 0,1 under runs/bench-methods
    .venv/bin/python bench/cache_quality.py --seeds 0,1,2 --out runs/bench-methods

The quickstart's KD student (`bench/methods.py`'s `fkl`: forward KL to the teacher's top-32,
50/50 with CE, 7 of 30 layers, the same steps as SFT) trained twice per seed on the same data:
from the exact cache (format 1: every top-32 log-prob in float16, 128 bytes/token) and from the
compact cache (format 2, `cache-logits`'s default: per position the fewest top tokens covering
96% of the teacher's probability, ids bit-packed, 8-bit log-probs relative to the top-1). Both
students are scored on bench/methods.py's 262 held-out prompts: teacher-relative KL and top-1
agreement on the teacher's greedy answers (the compact students without the greedy generation
that ROUGE-L needs: `teacher_relative`), and compact minus exact is reported per seed with a
paired bootstrap interval (same examples) and pooled over the seeds with the two-way bootstrap
(seeds and examples resampled). "tie" means the interval holds 0.

Everything is cached under `--out`, shared with bench/methods.py: its data, its student
initialisation, its `fkl` results (the exact cache's students) and its evaluation cache are
reused, so with bench/methods.py already run only the compact students are trained here.
The last line is JSON: bytes per token of both caches and compact-minus-exact KL and top-1,
pooled, with their intervals. `--train-only` trains the compact students and stops (to train
seeds side by side, then evaluate all).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import methods as m  # bench/methods.py: the same data, student, training and eval

from lmdistill.data.jsonl import write_json_atomic
from lmdistill.eval.stats import (
    paired_difference_interval,
    pooled_paired_difference_interval,
)


def compact_cache(b: m.Bench, paths: dict[str, Path]) -> Path:
    """The compact cache of the same data (built once; the exact one is bench/methods.py's)."""
    from lmdistill.pipelines.quickstart import MAX_LENGTH
    from lmdistill.teachers.cache import build_cache
    from lmdistill.teachers.registry import load_teacher

    out = paths["cache"].with_name("cache-compact")
    if not (out / "index.json").exists() or not out.with_suffix(".done").exists():
        m.say("[data] the compact cache")
        teacher = load_teacher(m.TEACHER)
        try:
            build_cache(
                teacher, paths["greedy"], out, top_k=b.top_k, max_length=MAX_LENGTH, progress=False
            )
        finally:
            teacher.close()
        out.with_suffix(".done").touch()
    return out


def cache_bytes_per_token(cache: Path) -> float:
    index = json.loads((cache / "index.json").read_text())
    shards = index["shards"].values()
    return sum(s["bytes"] for s in shards) / sum(s["positions"] for s in shards)


def compact_result(
    b: m.Bench, seed: int, paths, student: Path, cache: Path, steps: int, train_only: bool = False
) -> dict | None:
    out = b.results_dir() / f"fkl_compact-seed{seed}.json"
    if out.exists():
        return json.loads(out.read_text())
    raw = m.method_config(b, "fkl", seed, paths, student, steps)
    raw["run_dir"] = str(b.runs_dir() / "fkl_compact" / f"seed{seed}")
    raw["teacher"] = {"cache": str(cache)}
    m.say(f"[fkl_compact seed {seed}] training ...")
    final, seconds, steps_done = m.train_run(raw, f"bench fkl_compact seed {seed}")
    m.say(f"[fkl_compact seed {seed}] trained in {seconds:.0f}s ({steps_done} steps)")
    if train_only:
        return None
    result = {"method": "fkl_compact", "seed": seed, "train_seconds": seconds, "steps": steps_done}
    result.update(teacher_relative(str(final), paths))
    write_json_atomic(out, result)
    return result


def teacher_relative(model: str, paths: dict[str, Path]) -> dict[str, Any]:
    """Per-example KL and top-1 agreement sums (and token counts) of `model` on the teacher's
    greedy answers to the held-out prompts: the same `token_stats` that bench/methods.py's
    rel-jsonl evaluation runs, without the greedy generation behind its ROUGE-L (the part that
    takes most of its time, and not what a cache changes first). The answers are the ones
    `lmdistill generate` wrote into held_out.jsonl, which that evaluation reuses as well."""
    from lmdistill.eval.likelihood import as_scoring_model
    from lmdistill.eval.teacher_relative import read_prompt_file, token_stats
    from lmdistill.teachers.registry import load_teacher

    prompts = read_prompt_file(paths["held_out"])
    assert all(p.made is not None for p in prompts), "held_out.jsonl lacks the teacher's answers"
    teacher, student = load_teacher(m.TEACHER), load_teacher(model)
    try:
        stats, shared = token_stats(
            as_scoring_model(teacher, "KL"),
            as_scoring_model(student, "KL"),
            [p.messages for p in prompts],
            [p.made.text for p in prompts],
            [p.made.finish_reason == "stop" for p in prompts],
        )
    finally:
        teacher.close()
        student.close()
    assert shared
    order = sorted(range(len(prompts)), key=lambda i: str(prompts[i].id))
    return {
        "ids": [str(prompts[i].id) for i in order],
        "agree": [stats[i].agree for i in order],
        "kl": [stats[i].kl for i in order],
        "tokens": [float(stats[i].tokens) for i in order],
    }


def interval(a: list[dict], b: list[dict], metric: str) -> dict[str, Any]:
    field, per_token, higher = m.METRICS[metric]
    ids = sorted(set(a[0]["ids"]) & set(b[0]["ids"]))
    x, y = m.matrix(a, field, ids), m.matrix(b, field, ids)
    tokens = m.matrix(a, "tokens", ids) if per_token else None
    if len(a) == 1:
        i = paired_difference_interval(
            x[0],
            y[0],
            a_tokens=None if tokens is None else tokens[0],
            b_tokens=None if tokens is None else tokens[0],
        )
    else:
        i = pooled_paired_difference_interval(x, y, a_tokens=tokens, b_tokens=tokens)
    return {"value": i.estimate, "low": i.low, "high": i.high, "verdict": _verdict(i, higher)}


def _verdict(i, higher_is_better: bool) -> str:
    if i.low <= 0 <= i.high:
        return "tie"
    return "better" if (i.low > 0) == higher_is_better else "worse"


def per_token(r: dict, field: str) -> float:
    return float(np.sum(r[field]) / np.sum(r["tokens"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/bench-methods"))
    p.add_argument("--seeds", default="0,1", help="training seeds (default 0,1)")
    p.add_argument("--train-only", action="store_true", help="train the compact students, stop")
    a = p.parse_args(argv)
    seeds = tuple(int(s) for s in a.seeds.split(","))
    b = m.Bench(out=a.out, seeds=seeds, methods=("sft", "fkl"))
    paths = m.data_stage(b)
    student = m.student_stage(b, paths)
    cache = compact_cache(b, paths)
    exact, compact = [], []
    for seed in seeds:
        sft = m.method_result(b, "sft", seed, paths, student, 0)
        exact.append(m.method_result(b, "fkl", seed, paths, student, sft["steps"]))
        result = compact_result(b, seed, paths, student, cache, sft["steps"], a.train_only)
        if result is None:
            continue
        compact.append(result)
        # The same answers, tokenized alike: both evaluations scored the same tokens.
        tokens = dict(zip(exact[-1]["ids"], exact[-1]["tokens"], strict=True))
        assert all(tokens[i] == t for i, t in zip(result["ids"], result["tokens"], strict=True))
    if a.train_only:
        return 0
    sizes = {
        "exact": cache_bytes_per_token(paths["cache"]),
        "compact": cache_bytes_per_token(cache),
    }
    print(
        f"cache bytes/token: exact {sizes['exact']:.1f}, compact {sizes['compact']:.1f} "
        f"({sizes['compact'] / sizes['exact']:.2f}x)"
    )
    print(
        "| seed | KL exact | KL compact | KL compact − exact | top-1 exact | top-1 compact | "
        "top-1 compact − exact |"
    )
    print("|---|---|---|---|---|---|---|")
    fmt = "{value:+.3f} [{low:+.3f}, {high:+.3f}] {verdict}".format
    for seed, x, c in zip(seeds, exact, compact, strict=True):
        d = {k: interval([c], [x], k) for k in ("kl", "top1")}
        print(
            f"| {seed} | {per_token(x, 'kl'):.3f} | {per_token(c, 'kl'):.3f} | {fmt(**d['kl'])} | "
            f"{per_token(x, 'agree'):.3f} | {per_token(c, 'agree'):.3f} | {fmt(**d['top1'])} |"
        )
    pooled = {k: interval(compact, exact, k) for k in ("kl", "top1")}
    print(
        f"| pooled ({len(seeds)} seeds) | | | {fmt(**pooled['kl'])} | | | {fmt(**pooled['top1'])} |"
    )
    line: dict[str, Any] = {
        "exact_bytes_per_token": round(sizes["exact"], 1),
        "compact_bytes_per_token": round(sizes["compact"], 1),
        "seeds": len(seeds),
    }
    for k in ("kl", "top1"):
        line[f"compact_vs_exact_{k}"] = round(pooled[k]["value"], 4)
        line[f"compact_vs_exact_{k}_low"] = round(pooled[k]["low"], 4)
        line[f"compact_vs_exact_{k}_high"] = round(pooled[k]["high"], 4)
        line[f"compact_vs_exact_{k}_verdict"] = pooled[k]["verdict"]
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
