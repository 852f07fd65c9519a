"""Shared fixtures: tiny images made in a temporary folder, and the real data when present."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from bloodcell_lib.paths import SHARED_DATA_DIR

REAL_DATA = Path(os.environ.get("BLOODCELL_DATA", SHARED_DATA_DIR))


def real_data(*parts: str) -> Path:
    """Path under the real data root, or skip the test saying what is missing."""
    path = REAL_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not present: {path} (set $BLOODCELL_DATA or place ../shared/data)")
    return path
