import subprocess
import sys

from lmdistill import __version__
from lmdistill.cli import build_parser, main


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmdistill", *args], capture_output=True, text=True, timeout=120
    )


def test_version_and_help():
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"lmdistill {__version__}"
    helped = run_cli("--help")
    assert helped.returncode == 0
    assert "teacher" in helped.stdout and "student" in helped.stdout


def test_every_subcommand_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sub.choices, "no subcommands registered"
    for name, subparser in sub.choices.items():
        text = subparser.format_help()
        assert name in text and len(text) > 80


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out


def test_unknown_command_is_an_argparse_error():
    out = run_cli("frobnicate")
    assert out.returncode != 0 and "invalid choice" in out.stderr and "Traceback" not in out.stderr
