"""The `bloodcell` command (`python -m bloodcell_lib`) dispatches to its subcommands and explains itself."""
from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from bloodcell_lib import cli

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "bloodcell_lib", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("audit", "train", "predict", "evaluate", "report", "build", "screenshot"):
        assert command in result.stdout


def test_unknown_command_fails_with_usage():
    result = run_cli("fly")
    assert result.returncode == 2
    assert "usage: bloodcell" in result.stderr and "'fly'" in result.stderr


def test_console_script_points_at_the_cli():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["bloodcell"].partition(":")
    assert getattr(importlib.import_module(module), function) is cli.main


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_has_its_own_help(command, capsys):
    assert cli.main([command, "--help"]) == 0
    assert f"usage: {'run_all.sh' if command == 'build' else 'bloodcell ' + command}" in capsys.readouterr().out


def test_evaluate_names_a_missing_run_dir(tmp_path, capsys):
    missing = tmp_path / "no-run"
    assert cli.main(["evaluate", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_report_rebuilds_an_empty_reports_folder(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "index.html").is_file()
