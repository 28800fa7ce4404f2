"""`lmdistill plan RECIPE.yaml --gpus N --gpu-memory GiB`: memory, fit, tokens, hours and API spend
of a recipe before GPUs are booked (`lmdistill.pipelines.planner`)."""

from __future__ import annotations

import argparse
import json

DESCRIPTION = """\
Read a run recipe (lmdistill run) or a training recipe (lmdistill train) and the configs of its
models (no weights), and print per stage the memory per GPU of the teacher, the student, the
optimizer state, activations and loss chunks under DDP and FSDP with the teacher online, from the
offline cache or on a server; whether each fits; the tokens to process and the hours at the given
MFU; and the spend of an API teacher at the given prices."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="memory, time and API spend of a recipe, from model configs only",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", metavar="RECIPE.yaml")
    p.add_argument("--gpus", type=int, default=1, metavar="N")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GiB", help="per GPU")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation (default 0.4)")
    p.add_argument(
        "--gpu-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s (H100: 989)"
    )
    p.add_argument("--price-input", type=float, default=None, help="API teacher: USD per M tokens")
    p.add_argument("--price-output", type=float, default=None, help="API teacher: USD per M tokens")
    p.add_argument("--examples", type=int, default=None, help="data size, when it cannot be read")
    p.add_argument(
        "--example-tokens", type=int, default=None, help="tokens per example (default: chars / 4)"
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmdistill.pipelines.planner import PlanSettings, format_plan, plan_recipe

    settings = PlanSettings(
        gpus=args.gpus,
        gpu_memory_gib=args.gpu_memory,
        mfu=args.mfu,
        gpu_tflops=args.gpu_tflops,
        price_input=args.price_input,
        price_output=args.price_output,
        examples=args.examples,
        example_tokens=args.example_tokens,
    )
    plan = plan_recipe(args.recipe, settings)
    print(json.dumps(plan.to_json()) if args.json else format_plan(plan))
    return 0
