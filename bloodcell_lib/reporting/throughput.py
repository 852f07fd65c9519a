"""The throughput benchmark's result file (written by benchmarks/throughput.py): where it is,
its format tag, reading it, and the wording of what its project path trains."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from bloodcell_lib.core.paths import PROJECT_ROOT

# The throughput benchmark's result (benchmarks/throughput.py --out default), read for the
# ablation table's training-path rows when present.
THROUGHPUT_FILE = PROJECT_ROOT / "benchmarks" / "results" / "throughput.json"
THROUGHPUT_FORMAT = "bloodcell-throughput-benchmark"


def load_throughput(path: str | os.PathLike = THROUGHPUT_FILE) -> tuple[dict[str, Any] | None, str]:
    """(benchmark result, '') or (None, why not)."""
    path = Path(path)
    if not path.is_file():
        return None, (f"not measured: run `.venv/bin/python benchmarks/throughput.py` to write "
                      f"{_display_path(path)}")
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return None, f"{_display_path(path)} is unreadable ({err}); rerun benchmarks/throughput.py"
    if not isinstance(result, dict) or result.get("format") != THROUGHPUT_FORMAT:
        return None, f"{_display_path(path)} is not a {THROUGHPUT_FORMAT} result; rerun benchmarks/throughput.py"
    return result, ""


def _display_path(path: Path) -> str:
    try:
        return path.absolute().relative_to(PROJECT_ROOT).as_posix()
    except ValueError:
        return str(path)


def trained_layers_text(settings: Mapping[str, Any]) -> str:
    """What the benchmark's project path trains, from the benchmark's settings."""
    last = settings.get("unfreeze_last") or 0
    if not last:
        return "all layers trained"
    return f"last {last} stages + head trained" + (", frozen BN statistics adapted"
                                                   if settings.get("adapt_frozen_bn") else "")

