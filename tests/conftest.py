"""Shared fixtures: tiny images made in a temporary folder, and the real data when present."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest

from bloodcell_lib.core.paths import SHARED_DATA_DIR

REAL_DATA = Path(os.environ.get("BLOODCELL_DATA", SHARED_DATA_DIR))


@pytest.fixture(scope="session", autouse=True)
def cache_outside_the_project(tmp_path_factory):
    """Tests cache in a temporary folder, never in the project's cache/ (a user's cache must not
    fill with test pictures), in this process and in the processes tests start."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BLOODCELL_CACHE", str(folder))
        yield folder


def real_data(*parts: str) -> Path:
    """Path under the real data root, or skip the test saying what is missing."""
    path = REAL_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not present: {path} (set $BLOODCELL_DATA or place ../shared/data)")
    return path


@contextlib.contextmanager
def benchmark_script(name: str):
    """``benchmarks/<name>.py`` imported as a module for the duration of the block (registered
    in sys.modules meanwhile: dataclasses look their module up by name)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bloodcell_benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
