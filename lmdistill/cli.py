"""The `lmdistill` command. Each subcommand lives in `lmdistill.commands.<name>` as a thin layer over a
library function; this module only wires them together and turns user errors into one clean line."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from lmdistill import __version__
from lmdistill.errors import UserError

# Subcommand modules, in the order `--help` lists them. Each defines `register(subparsers)`, which adds
# its parser and sets `func(args) -> int`. Heavy imports (torch, transformers) happen inside `func`, so
# `lmdistill --help` stays fast.
COMMAND_MODULES: tuple[str, ...] = (
    "lmdistill.commands.quickstart",
    "lmdistill.commands.run",
    "lmdistill.commands.generate",
    "lmdistill.commands.prompts",
    "lmdistill.commands.serve",
    "lmdistill.commands.cache_logits",
    "lmdistill.commands.train",
    "lmdistill.commands.self_distill",
    "lmdistill.commands.eval",
    "lmdistill.commands.plan",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmdistill",
        description=(
            "Distill a large language model (the teacher) into a smaller one (the student), "
            "and measure what the student kept."
        ),
    )
    parser.add_argument("--version", action="version", version=f"lmdistill {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        for line in str(exc).splitlines() or [""]:
            print(f"lmdistill {args.command}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmdistill {args.command}: interrupted", file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    """Our own progress bars say what is happening; transformers' per-load "Loading weights" bar
    (printed every time a model dir is opened) only adds noise."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    hf_logging.disable_progress_bar()


if __name__ == "__main__":
    raise SystemExit(main())
