"""Every path the project uses, in one place (cookiecutter-data-science style).

Data roots are searched in a fixed order so that the same code works on CI's read-only
``../shared/data``, on a user's Kaggle download under ``data/raw`` and anywhere else given
explicitly or through ``$BLOODCELL_DATA``.
"""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = PROJECT_ROOT / "data"
RAW_DATA_DIR = DATA_DIR / "raw"
SHARED_DATA_DIR = PROJECT_ROOT.parent / "shared" / "data"
# Overridable so that tests and parallel builds never touch the user's runs (the reports
# folder: reporting.summary.reports_dir, read when called).
RUNS_DIR = Path(os.environ.get("BLOODCELL_RUNS", PROJECT_ROOT / "runs"))
CACHE_DIR = Path(os.environ.get("BLOODCELL_CACHE", PROJECT_ROOT / "cache"))
NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
EXPERIMENTS_DIR = PROJECT_ROOT / "experiments"


class DataNotFoundError(FileNotFoundError):
    """No candidate data root holds the requested data set."""


def data_root_candidates(explicit: str | os.PathLike | None = None) -> list[tuple[str, Path]]:
    """Where data is looked for, in order, each with the reason it is a candidate."""
    candidates: list[tuple[str, Path]] = []
    if explicit:
        candidates.append(("explicit argument", Path(explicit).expanduser()))
    env = os.environ.get("BLOODCELL_DATA")
    if env:
        candidates.append(("$BLOODCELL_DATA", Path(env).expanduser()))
    candidates.append(("project data/raw", RAW_DATA_DIR))
    candidates.append(("../shared/data beside the checkout", SHARED_DATA_DIR))
    return candidates


def find_data_dir(layouts: list[str], dataset: str, explicit: str | os.PathLike | None = None) -> Path:
    """First existing ``root/layout`` over all candidate roots and known layouts.

    ``layouts`` are relative folder names a data set may sit under (``"."`` means the root
    itself), e.g. both the shared copy's ``blood-cells/dataset2-master`` and Kaggle's
    doubled ``dataset2-master/dataset2-master``.
    """
    looked: list[str] = []
    for why, root in data_root_candidates(explicit):
        for layout in layouts:
            folder = (root / layout).resolve() if layout != "." else root.resolve()
            looked.append(f"{folder} ({why})")
            if folder.is_dir():
                return folder
    raise DataNotFoundError(
        f"data set '{dataset}' not found. Looked in:\n  " + "\n  ".join(looked)
        + "\nPass the folder explicitly, set $BLOODCELL_DATA, or place the data under data/raw/ "
        "(see data/README.md)."
    )
