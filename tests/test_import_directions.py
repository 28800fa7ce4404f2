"""Every import arrow points down (issue 14, item 5): each module of lmdistill imports only from
its own layer and the layers its layer is allowed to use, lazy imports inside functions included.

Read from the source with `ast` (nothing is imported), so a back-arrow fails here before it can
become an import cycle that only shows at run time."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lmdistill"

# Module prefix -> layer; the longest matching prefix wins.
LAYER_OF = {
    "lmdistill": "root",  # __version__ only
    "lmdistill.errors": "errors",
    "lmdistill.store": "store",
    "lmdistill.losses": "losses",
    "lmdistill.models": "models",
    # The bundled teacher's files (GGUF -> model dir) need only errors and store; models.py
    # resolves bundled names through it, so it sits with models, below data.
    "lmdistill.teachers.bundled": "models",
    "lmdistill.data": "data",
    "lmdistill.teachers": "teachers",
    "lmdistill.training": "training",
    "lmdistill.tasks": "tasks",
    "lmdistill.skills": "skills",
    "lmdistill.eval": "eval",
    "lmdistill.serve": "serve",
    "lmdistill.pipelines": "pipelines",
    "lmdistill.commands": "commands",
    "lmdistill.cli": "cli",
    "lmdistill.__main__": "cli",
}

# The package root (its __version__ and nothing else) and errors are below everything.
_BASE = {"root", "errors"}
# Layer -> the other layers it may import (its own is always allowed).
ALLOWED: dict[str, set[str]] = {
    "root": set(),
    "errors": set(),
    "store": _BASE,  # below everything else: every layer may use it
    "losses": _BASE,  # pure functions: nothing of lmdistill but errors
    "models": _BASE | {"store"},
    "data": _BASE | {"store", "models"},  # nothing above it
    "teachers": _BASE | {"store", "models", "data"},  # never training, pipelines, eval
    "training": _BASE | {"store", "losses", "models", "data", "teachers"},
    "tasks": _BASE | {"store", "models", "data", "teachers"},  # never skills, pipelines, eval
    "skills": _BASE | {"store", "models", "data", "teachers", "tasks"},  # never pipelines, eval
    "eval": _BASE | {"store", "losses", "models", "data", "teachers", "tasks", "skills"},
    "serve": _BASE | {"store", "models", "data", "teachers"},
    # Only pipelines composes teachers, training and eval.
    "pipelines": _BASE
    | {"store", "losses", "models", "data", "teachers", "training", "tasks", "skills", "eval"},
    "commands": _BASE
    | {"store", "losses", "models", "data", "teachers", "training", "tasks", "skills", "eval"}
    | {"pipelines", "serve"},
    "cli": _BASE | {"commands"},
}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        layer = LAYER_OF.get(".".join(parts[:end]))
        if layer is not None:
            return layer
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, module: str, *, is_package: bool) -> list[tuple[str, int]]:
    """(imported lmdistill module, line) for every import statement anywhere in `source`:
    top-level, inside functions and classes, under `if TYPE_CHECKING`. `from lmdistill.x import
    y` counts as importing lmdistill.x.y, so importing a submodule by name is seen too."""
    found = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from lmdistill.teachers import bundled` imports lmdistill.teachers.bundled.
            found += [(f"{target}.{alias.name}", node.lineno) for alias in node.names]
    return [(name, line) for name, line in found if name.split(".")[0] == "lmdistill"]


def back_arrows(module: str, source: str, *, is_package: bool) -> list[str]:
    """'module:line imports target (layer -> layer)' for each import its layer may not make."""
    own = layer_of(module)
    wrong: dict[str, None] = {}  # one line per import statement, in order
    for target, line in imports(source, module, is_package=is_package):
        theirs = layer_of(target)
        if theirs != own and theirs not in ALLOWED[own]:
            named = target if _is_module(target) else target.rpartition(".")[0]
            wrong[f"{module}:{line} imports {named} ({own} -> {theirs})"] = None
    return list(wrong)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.is_dir() or path.with_suffix(".py").is_file()


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    unplaced = [module_name(p) for p in modules() if layer_of(module_name(p)) not in ALLOWED]
    assert not unplaced, f"place these in LAYER_OF: {unplaced}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: module_name(p))
def test_imports_point_down(path: Path):
    wrong = back_arrows(
        module_name(path), path.read_text(encoding="utf-8"), is_package=path.name == "__init__.py"
    )
    assert not wrong, "imports that run back up:\n" + "\n".join(wrong)


def test_only_the_cli_imports_commands():
    """Commands are the CLI's thin layer: no library code may depend on one."""
    for path in modules():
        module = module_name(path)
        if layer_of(module) in {"commands", "cli"}:
            continue
        source = path.read_text(encoding="utf-8")
        targets = imports(source, module, is_package=path.name == "__init__.py")
        assert not [t for t, _ in targets if layer_of(t) == "commands"], module


@pytest.mark.parametrize(
    "path", sorted((PACKAGE / "commands").glob("[!_]*.py")), ids=lambda p: p.stem
)
def test_a_command_holds_no_logic(path: Path):
    """A command module is its parser (`register`) and one entry that maps the arguments onto a
    library call (`main` or `run`): a helper or a class there is logic that `lmdistill run` and
    library users would lack, and belongs in the layer the command calls."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    defined = [
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    ]
    assert defined[:1] == ["register"] and defined[1:] in (["main"], ["run"]), defined


def test_no_private_name_crosses_a_package():
    """A name with a leading underscore is its package's own business: another package that needs
    it gets a public one."""
    crossing = []
    for path in modules():
        module = module_name(path)
        home = module.split(".")[:2]
        for target, line in imports(path.read_text(encoding="utf-8"), module, is_package=False):
            name = target.rpartition(".")[2]
            if name.startswith("_") and not name.startswith("__") and target.split(".")[:2] != home:
                crossing.append(f"{module}:{line} imports {target}")
    assert not crossing, crossing


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("lmdistill.teachers.cache", "def f():\n    from lmdistill.training.signals import x\n"),
        ("lmdistill.losses.fused", "import lmdistill.data.sft\n"),
        ("lmdistill.eval.cost", "from lmdistill.pipelines import generate\n"),
        ("lmdistill.tasks.humaneval", "from ..eval import sandbox\n"),
        (
            "lmdistill.store.atomic",
            "class A:\n    def f(self):\n        from lmdistill import data\n",
        ),
        ("lmdistill.data.records", "from lmdistill.teachers.base import Message\n"),
    ],
)
def test_a_reversed_arrow_is_caught(module: str, source: str):
    """The checker itself: top-level, lazy (in a function or method), relative and submodule
    imports that run up are all reported."""
    wrong = back_arrows(module, source, is_package=False)
    assert len(wrong) == 1 and wrong[0].startswith(f"{module}:")


def test_a_downward_arrow_passes():
    source = (
        "from lmdistill.store import atomic\ndef f():\n    from lmdistill.data.sft import Batch\n"
    )
    assert back_arrows("lmdistill.training.loop", source, is_package=False) == []
