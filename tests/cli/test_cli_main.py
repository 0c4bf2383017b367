"""The CLI's contract: every command is listed with help, and failures are one line with a non-zero exit."""

import re
import subprocess

import pytest

from bdm.cli import main as cli_main
from bdm.errors import BdmError


def run_bdm(*args):
    return subprocess.run(["bdm", *args], capture_output=True, text=True)


COMMANDS = ["export", "validate", "inspect", "build-engine", "doctor", "upscale", "bench", "generate"]


def test_help_lists_every_command():
    """`bdm --help` has one row per command (the name in the first column, its summary beside it): exactly these."""
    import click
    import typer

    group = typer.main.get_command(cli_main.app)
    assert sorted(group.list_commands(click.Context(group))) == sorted(COMMANDS)
    out = run_bdm("--help")
    assert out.returncode == 0
    rows = [re.match(r"^\W*([a-z][a-z-]*)\s{2,}\w", line) for line in out.stdout.splitlines()]
    assert [row.group(1) for row in rows if row] == COMMANDS  # registration order
    for name in COMMANDS:
        assert group.get_command(click.Context(group), name).get_short_help_str().strip(), name


@pytest.mark.parametrize("exc, code, text", [
    (BdmError("no such file: x.pth"), 2, "bdm: error: no such file: x.pth"),
    (RuntimeError("boom"), 3, "bdm: internal error: RuntimeError: boom"),
])
def test_failures_are_one_line(monkeypatch, capsys, exc, code, text):
    def fail(*_args, **_kwargs):
        raise exc

    monkeypatch.setattr(cli_main, "app", fail)
    monkeypatch.delenv("BDM_DEBUG", raising=False)
    with pytest.raises(SystemExit) as stop:
        cli_main.main([])
    assert stop.value.code == code
    err = capsys.readouterr().err
    assert err.startswith(text) and err.count("\n") == 1
