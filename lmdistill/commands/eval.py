"""`lmdistill eval`: evaluate a student, its teacher and a baseline, and write the retention report
(`lmdistill.eval.runner.evaluate`, then `lmdistill.eval.report.write_report`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmdistill.errors import UserError

DESCRIPTION = """\
Evaluate MODEL (the student) and optionally its TEACHER and a BASELINE (e.g. the untrained
student) on a set of tasks; write OUT/report.md, OUT/report.html (self-contained, with plots) and
OUT/report.json, with per-task scores, retention (student / teacher) with intervals, and cost.

Models: a bundled name (smollm2-135m-instruct), a Hugging Face model dir, a Hub name
ORG/NAME[@REVISION], openai:MODEL or a URL.

Tasks (comma-separated):
  arithmetic_1digit, arithmetic, gsm_symbolic, knights_knaves, countdown, rg:NAME, jsonl:PATH[@RULE]
                           verifiable generation: generate, extract the answer, compare
  template:NAME:TASK       such a task asked with reasoning template NAME (step_by_step, concise,
                           system), as self-distill asks it, e.g. template:concise:arithmetic
  humaneval                code pass@k in a sandbox (use --n-samples 10 for pass@10)
  mc-builtin, mc-jsonl:PATH   multiple choice by log-likelihood (append @letters for MMLU's format)
  rel, rel:TASK, rel-jsonl:PATH   teacher-relative: KL(teacher||student), top-1 agreement,
                           perplexity on teacher responses, ROUGE-L (needs --teacher)
  ref-jsonl:PATH           ROUGE-L against the file's responses (e.g. a text-only teacher's
                           answers) and the perplexity of their tokens; no teacher needed
  lmeval:TASK              an lm-eval-harness task (when lm-eval is installed)
  tool-use[:TASK][:tools=NAME+NAME...][:turns=N]
                           the tool loop (default: task tool_use, all its tools, 4 turns): call
                           validity, tool-name, argument and final-answer accuracy

Results are cached under OUT/cache by (model fingerprint, task, settings): rerunning costs nothing.
Decoding is greedy unless --n-samples > 1 or --temperature is given."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate a student against its teacher: retention and cost report",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="SPEC", help="the model to evaluate")
    p.add_argument("--teacher", default=None, metavar="SPEC", help="its teacher (for retention)")
    p.add_argument("--baseline", default=None, metavar="SPEC", help="e.g. the untrained student")
    p.add_argument(
        "--tasks", required=True, action="append", metavar="T1,T2", help="tasks (see above)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="where the report goes")
    run = p.add_argument_group("settings")
    run.add_argument("--limit", type=int, default=None, metavar="N", help="examples per task")
    run.add_argument(
        "--n-samples", type=int, default=1, metavar="N", help="responses per prompt (default 1)"
    )
    run.add_argument(
        "--temperature",
        type=float,
        default=None,
        metavar="T",
        help="default: 0 (greedy) for one sample, 0.8 for several",
    )
    run.add_argument(
        "--max-tokens", type=int, default=256, metavar="N", help="per response (default 256)"
    )
    run.add_argument(
        "--batch-size", type=int, default=16, metavar="N", help="sequences per batch (default 16)"
    )
    run.add_argument("--seed", type=int, default=0, metavar="S", help="default 0")
    run.add_argument("--run-dir", default=None, metavar="DIR", help="plot this run's metrics.jsonl")
    cost = p.add_argument_group("cost")
    cost.add_argument(
        "--no-cost", action="store_true", help="skip the speed and memory measurement"
    )
    cost.add_argument(
        "--price-input", type=float, default=None, metavar="USD_PER_M", help="teacher's input price"
    )
    cost.add_argument(
        "--price-output",
        type=float,
        default=None,
        metavar="USD_PER_M",
        help="teacher's output price (the model's when there is no teacher)",
    )
    cache = p.add_argument_group("cache")
    cache.add_argument("--cache-dir", default=None, metavar="DIR", help="default OUT/cache")
    cache.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from lmdistill.eval.base import EvalSettings
    from lmdistill.eval.report import write_report
    from lmdistill.eval.runner import evaluate
    from lmdistill.teachers.base import Prices

    settings = EvalSettings(
        limit=args.limit,
        n_samples=args.n_samples,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    prices = None
    if args.price_input is not None or args.price_output is not None:
        prices = Prices(args.price_input or 0.0, args.price_output or 0.0)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out must be a directory, and {out} is a file")
    cache_dir = None if args.no_cache else Path(args.cache_dir or out / "cache")
    results = evaluate(
        args.model,
        args.tasks,
        teacher=args.teacher,
        baseline=args.baseline,
        settings=settings,
        prices=prices,
        cache_dir=cache_dir,
        measure_cost=not args.no_cost,
        run_dir=args.run_dir,
    )
    paths = write_report(results, out)
    for task in results.tasks:
        if task.skipped is None and "student" in task.retention:
            score = task.retention["student"]
            kept = "undefined (teacher scores 0)" if score is None else str(score)
            print(f"{task.name}: retention {kept}")
    print(f"report: {paths['markdown']}, {paths['html']}, {paths['json']}")
    return 0
