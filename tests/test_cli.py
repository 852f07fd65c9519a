"""`python -m bloodcell_lib` dispatches to its commands and explains itself."""
from __future__ import annotations

import subprocess
import sys


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "bloodcell_lib", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("audit", "train", "predict"):
        assert command in result.stdout


def test_unknown_command_fails_with_usage():
    result = run_cli("fly")
    assert result.returncode == 2
    assert "usage" in result.stdout
