"""`lmdistill self-distill RECIPE.yaml [key=value ...] [--dry-run]`: rounds of sampling, scoring,
selecting and fine-tuning a model on its own best answers (`lmdistill.pipelines.self_distill`)."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Self-distillation (rejection-sampling fine-tuning, STaR / ReST-EM): each round samples n answers
per train prompt from the current model, scores them (the task's scorer, a reward function, or a
teacher's log-likelihood), keeps the best, fine-tunes on them (SFT), and scores the new model on
held-out examples. Round 0 is the start model. Settings can be overridden with dotted keys, e.g.
rounds=3 sampling.n=8 run_dir=runs/try2. Rerunning continues after the last finished round.
Writes RUN_DIR/rounds.md, rounds.json and rounds.png."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "self-distill",
        help="improve a model on a verifiable task by training on its own best samples",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", metavar="RECIPE.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the whole recipe (exit 2 on a problem), print it resolved and the plan, "
        "load no model, and exit",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmdistill.pipelines.self_distill import (
        dump,
        load_self_distill_config,
        plan,
        self_distill,
        summary,
    )
    from lmdistill.pipelines.validate import check_self_distill

    config = load_self_distill_config(args.recipe, args.overrides)
    check_self_distill(config, args.recipe)  # model, task, scorer: before round 0 starts
    if args.dry_run:
        print(dump(config).rstrip())
        print()
        print(plan(config))
        return 0
    result = self_distill(config)
    print(summary(result))
    return 0
