"""The metrics.json document: build facts, every record, the references, the targets table
and the ablation table."""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from bloodcell_lib.reporting.ablation import ablation_table
from bloodcell_lib.reporting.records import METRICS_FILE, load_records, reports_dir
from bloodcell_lib.reporting.study import REFERENCES
from bloodcell_lib.reporting.targets import targets_table


def load_metrics(root: str | os.PathLike | None = None) -> dict[str, Any]:
    """metrics.json of a reports folder; built from the records when absent (notebook use)."""
    root = Path(root) if root is not None else reports_dir()
    path = root / METRICS_FILE
    if path.is_file():
        return json.loads(path.read_text())
    return metrics_document(load_records(root))


def metrics_document(records: Sequence[Mapping[str, Any]], **info: Any) -> dict[str, Any]:
    """The metrics.json document: ``info`` (profile, git, build_seconds, ... from run_all), every
    record, the published references, the targets (``targets_table``) and the ablation table
    (``ablation_table``)."""
    from bloodcell_lib.evaluation import crosslab

    document = {
        "format": "bloodcell-metrics",
        "version": 1,
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **info,
        "experiments": [dict(r) for r in records],
        "references": REFERENCES,
    }
    document["cross_lab"] = crosslab.gather(records)
    document["targets"] = targets_table(document)
    document["ablation"] = ablation_table(document)
    return document

