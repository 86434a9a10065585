"""What the CLI tests share: run segcli in-process, check the exit code, read the masks a run wrote."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from segcli.cli import app

runner = CliRunner()


def cli(*args):
    """``segcli ARGS...`` in-process (arguments turned into strings); the click Result."""
    return runner.invoke(app, [str(a) for a in args])


def ok(result, code: int = 0):
    """Assert the exit code, showing the output and exception when it differs; return the result."""
    assert result.exit_code == code, f"exit {result.exit_code}, expected {code}:\n{result.output}\n{result.exception!r}"
    return result


def pngs(folder: Path) -> dict[str, bytes]:
    """Every PNG below ``folder`` by relative path, as bytes (for byte-for-byte comparisons of runs)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.png"))}
