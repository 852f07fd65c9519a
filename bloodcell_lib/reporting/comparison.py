"""The comparison table: every experiment beside the published reference numbers."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from bloodcell_lib.reporting.formatting import cell_text, format_score
from bloodcell_lib.reporting.study import REFERENCES


def _init_text(record: Mapping[str, Any]) -> str:
    """Where the weights started: another experiment's model, ImageNet, or random."""
    source = ((record.get("provenance") or {}).get("config") or {}).get("init_from")
    if source:
        return f"from {source}"
    used = record.get("pretrained_used")
    return "" if used is None else "pretrained" if used else "RANDOM INIT"


def comparison_table(records: Sequence[Mapping[str, Any]], *, references: bool = True, formatted: bool = True):
    """One row per experiment (``row``: ``experiment``, or ``ablation`` with the experiment it
    varies in ``ablation of``), then the reference rows (labelled ``reference``)."""
    import pandas as pd

    rows = []
    for r in records:
        row = {
            "row": "ablation" if r.get("ablation_of") else "experiment", "experiment": r.get("name"),
            **({"ablation of": r["ablation_of"]} if r.get("ablation_of") else {}),
            "dataset": r.get("dataset"), "split": r.get("split"),
            "model": r.get("model"), "image size": r.get("image_size"), "epochs": r.get("epochs"),
            "train/val/test": "/".join("" if r.get(k) is None else str(r.get(k)) for k in ("n_train", "n_val", "n_test")),
            "init": _init_text(r),
            "profile": r.get("profile"), "train s": r.get("train_seconds"), "total s": r.get("total_seconds"),
        }
        for key, label in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced acc."), ("macro_f1", "macro-F1"),
                           ("roc_auc_ovr", "ROC-AUC"), ("ece", "ECE")):
            row[label] = format_score(r.get(key), r.get(f"{key}_sd")) if formatted else r.get(key)
        rows.append(row)
    if references:
        for ref in REFERENCES:
            acc = ref["accuracy"]
            text = (f"{ref['accuracy_low']:.2f}-{acc:.2f}" if ref.get("accuracy_low") is not None else f"{acc:.3f}")
            rows.append({"row": "reference", "experiment": ref["label"], "dataset": ref["dataset"],
                         "split": ref["split"], "model": ref["model"],
                         "image size": ref.get("image_size") or "", "accuracy": text if formatted else acc,
                         "source": ref["source"]})
    if formatted:
        rows = [{k: cell_text(v) for k, v in row.items()} for row in rows]
    frame = pd.DataFrame(rows)
    order = ["row", "experiment", "ablation of", "dataset", "split", "model", "image size", "epochs", "train/val/test",
             "accuracy", "balanced acc.", "macro-F1", "ROC-AUC", "ECE", "init", "train s", "total s", "profile", "source"]
    frame = frame[[c for c in order if c in frame.columns]]
    return frame.fillna("") if formatted else frame

