"""`lmdistill run RECIPE.yaml [key=value ...] [--from STAGE] [--dry-run]`: the whole job
(`lmdistill.pipelines.run.run_recipe`)."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Run a recipe's stages in order:

  prompts -> generate -> filter -> cache_logits -> train -> eval -> report

A recipe has a section per stage it wants (see recipes/). Each stage is skipped when its settings
and everything it reads are unchanged since it last finished, re-run from scratch when they
changed, and resumed when it was interrupted. Outputs go under the recipe's run_dir; the report
is run_dir/report/report.md. Settings can be overridden with dotted keys, e.g.
generate.n=4 train.optim.lr=3e-4 run_dir=runs/try2."""


def register(subparsers: argparse._SubParsersAction) -> None:
    from lmdistill.pipelines.run import STAGES

    p = subparsers.add_parser(
        "run",
        help="run a recipe end to end: prompts, generate, filter, cache, train, eval, report",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", metavar="RECIPE.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    p.add_argument(
        "--from",
        dest="start",
        choices=STAGES,
        metavar="STAGE",
        help=f"re-run this stage and every later one ({', '.join(STAGES)})",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the whole recipe (exit 2 on a problem), print it resolved and what each "
        "stage would do; run nothing",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from lmdistill.pipelines.run import describe_plan, load_recipe, run_recipe, summary_table

    recipe = load_recipe(args.recipe, args.overrides)
    began = time.perf_counter()
    result = run_recipe(recipe, start=args.start, dry_run=args.dry_run, source=args.recipe)
    if args.dry_run:
        print(describe_plan(recipe, result))
        return 0
    print(f"\nstages:\n{summary_table(result)}", file=sys.stderr)
    where = f"; report: {result.report}" if result.report else ""
    print(f"total {time.perf_counter() - began:.1f}s; outputs in {result.run_dir}{where}")
    return 0
