"""Answers computed from data files once and kept under ``cache/`` as JSON.

Some per-file facts (which augmented copies belong together, where the stained cell is)
take seconds to minutes to compute over a data set and never change while the files do
not, so they are stored keyed by what they were computed from: the method and its
settings, and every file's path, size and modification time. An edited, added or removed
file gives another key; ``cache/`` can be deleted at any time.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from bloodcell_lib.core import paths
from bloodcell_lib.core.fileio import atomic_write_json


def _cache_file(kind: str, method: str, files: Sequence[str | os.PathLike]) -> Path:
    key = hashlib.sha256(f"{method}\n".encode())
    for path in files:
        try:
            stat = os.stat(path)
            key.update(f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        except OSError:
            key.update(f"{path}\tmissing\n".encode())
    return paths.cache_dir() / kind / f"{len(files)}_{key.hexdigest()[:20]}.json"


def cached_per_file(kind: str, method: str, files: Sequence[str | os.PathLike],
                    compute: Callable[[Sequence[str | os.PathLike]], list[Any]]) -> list[Any]:
    """``compute(files)`` (one JSON-able answer per file), or its stored answer for these files.

    ``method`` names the computation and its settings: change it when the computation changes.
    """
    stored = _cache_file(kind, method, files)
    try:
        answers = json.loads(stored.read_text())["answers"]
        if len(answers) == len(files):
            return answers
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not computed yet, or a damaged cache file: compute again
    answers = compute(files)
    atomic_write_json(stored, {"method": method, "answers": answers})
    return answers
