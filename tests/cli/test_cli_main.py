"""The CLI's contract: every command is listed with help, and failures are one line with a non-zero exit."""

import subprocess

import pytest

from bdm.cli import main as cli_main
from bdm.errors import BdmError


def run_bdm(*args):
    return subprocess.run(["bdm", *args], capture_output=True, text=True)


def test_help_lists_every_command():
    out = run_bdm("--help")
    assert out.returncode == 0
    for command in ("export", "build-engine", "upscale", "validate", "inspect", "doctor"):
        assert command in out.stdout


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
