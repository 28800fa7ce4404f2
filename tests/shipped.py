"""The shipped recipes (recipes/*.yaml) and how tests run them: with the command each recipe opens
with, from the repository root (recipes name repository paths such as lmdistill/assets/)."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def opening_command(path: Path) -> list[str]:
    """The recipe's first line, `# lmdistill COMMAND recipes/NAME.yaml`, as CLI arguments."""
    first = path.read_text().splitlines()[0]
    assert first.startswith("# lmdistill "), f"{path.name} must open with its command: {first}"
    return shlex.split(first.removeprefix("# lmdistill "))


@dataclass
class Ran:
    """What one run of a recipe left: its exit code, what it printed and its run dir."""

    code: int
    out: str
    err: str
    run_dir: Path

    def json(self, name: str) -> Any:
        return json.loads((self.run_dir / name).read_text())

    def jsonl(self, name: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (self.run_dir / name).read_text().splitlines()]

    @cached_property
    def report(self) -> dict[str, Any]:
        return self.json("report/report.json")

    def stages(self) -> dict[str, str]:
        """`lmdistill run`'s stages and their status, as its state file records them."""
        return {k: v["status"] for k, v in self.json(".run/state.json")["stages"].items()}

    def task(self, prefix: str) -> dict[str, Any]:
        """The report's entry for the one task whose name starts with `prefix`."""
        (name,) = [n for n in self.report["tasks"] if n.startswith(prefix)]
        return self.report["tasks"][name]
