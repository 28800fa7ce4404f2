"""`lmdistill train RECIPE.yaml [key=value ...]`: one training run (`lmdistill.training.train`).

Multi-process: `accelerate launch --multi_gpu --num_processes N -m lmdistill train RECIPE.yaml`
(also on a CPU-only machine, where the loop then uses gloo; accelerate's `--cpu` launcher starts a
single process unless given an MPI hostfile), or `torchrun --nproc_per_node N -m lmdistill train`."""

from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = """\
Train a student from a YAML recipe (see recipes/). Settings can be overridden on the command line
with dotted keys, e.g. optim.lr=3e-4 objectives.0.temperature=2 run_dir=runs/try2. The resolved
recipe is saved as RUN_DIR/config.yaml; metrics go to RUN_DIR/metrics.jsonl; the trained student
to RUN_DIR/final (an HF model dir).

Several processes (data parallel; batch.micro_batches_per_step is the global count, so the curve
matches one process):  accelerate launch --multi_gpu --num_processes N -m lmdistill train RECIPE
On a CPU-only machine this runs N gloo processes; `accelerate launch --cpu` starts only one
unless given an MPI hostfile."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a student from a recipe (SFT, logit, hidden-state, on-policy or cross-tokenizer KD)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", metavar="RECIPE.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in run_dir from its last checkpoint (same recipe); not needed "
        "when only the final save was interrupted: a plain rerun finishes it",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the whole recipe (exit 2 on a problem), print it resolved and the plan; "
        "load no model",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmdistill.pipelines.validate import check_train_config
    from lmdistill.training.config import describe_plan, dump, load_config

    config = load_config(args.recipe, args.overrides)  # validate before the heavy imports
    check_train_config(config, args.recipe)  # models, files, combinations: before any load
    if args.dry_run:
        print(dump(config))
        print(describe_plan(config))
        return 0

    from transformers.utils import logging as hf_logging

    from lmdistill.training.loop import Trainer

    hf_logging.disable_progress_bar()  # weight-loading bars would bury the training bar
    trainer = Trainer(config, resume=args.resume)
    result = trainer.run()
    if trainer.main:
        summary = {"final": str(result.final_dir), "steps": result.steps, "eval": result.eval}
        print(json.dumps(summary), file=sys.stdout)
    return 0
