"""One JSON record per experiment: ``build_record`` (03_evaluate) reads the run directory and
the evaluation, ``write_record`` writes ``REPORTS_DIR/<experiment>/record.json``,
``load_records`` gathers them. Also the reports folder's layout (file names, the folders of an
experiment and of its figures; the folder itself is ``core.paths.reports_dir``)."""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from bloodcell_lib.core.fileio import atomic_write_json
from bloodcell_lib.core.paths import reports_dir
from bloodcell_lib.modeling.rundir import RunDir

EXPERIMENT_NOTEBOOKS = ("01_explore", "02_train", "03_evaluate")
REPORT_NOTEBOOK = "04_report"
RECORD_FILE = "record.json"
METRICS_FILE = "metrics.json"
INDEX_FILE = "index.html"
FIGURES_DIR = "figures"

# Fields every metrics.json record carries (tests and readers rely on these names).
RECORD_FIELDS = ("name", "title", "dataset", "split", "model", "image_size", "epochs", "n_train", "n_val",
                 "n_test", "accuracy", "balanced_accuracy", "macro_f1", "per_class_f1", "roc_auc_ovr", "ece",
                 "train_seconds", "total_seconds", "profile", "pretrained_used", "provenance")
SCALAR_FIELDS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_ovr", "ece")


def experiment_dir(name: str) -> Path:
    return reports_dir() / name


def figure_dir(name: str | None = None) -> Path:
    """Where a notebook saves the PNG copies of its key figures (used by index.html)."""
    return (experiment_dir(name) if name else reports_dir()) / FIGURES_DIR


def init_message(pretrained_requested: bool, pretrained_used: bool, model: str) -> str | None:
    """The sentence the reports print when ImageNet weights were asked for but unavailable."""
    if pretrained_requested and not pretrained_used:
        return (f"Trained from random initialisation: ImageNet weights for {model} were unavailable "
                f"(no network and no local copy), so this model did not start from pretrained weights.")
    if not pretrained_requested:
        return f"Trained from random initialisation (pretrained = false) for {model}."
    return None


def as_number(value: Any) -> float | None:
    try:
        if value is None:
            return None
        out = float(value)
        return None if math.isnan(out) else out
    except (TypeError, ValueError):
        return None


def split_description(cfg) -> str:
    if cfg.cv_folds:
        return f"{cfg.cv_folds}-fold CV (mean \u00b1 sd over folds)"
    if cfg.dataset == "kaggle":
        return "official TRAIN / TEST (val from TRAIN)"
    if cfg.dataset == "multi" and cfg.test_source:
        trained = ", ".join(name for name in cfg.sources if name != cfg.test_source)
        return f"lab {cfg.test_source} held out: all of it test; train/val from {trained}"
    train = 1 - cfg.val_fraction - cfg.test_fraction
    return (f"{train * 100:.0f}/{cfg.val_fraction * 100:.0f}/{cfg.test_fraction * 100:.0f} train/val/test "
            "(stratified, grouped)")


def run_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """The run directory itself, or its ``fold_<i>`` sub-directories (cross-validation)."""
    return [run.path for run in RunDir(run_dir).runs()]


def run_infos(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """run_info.json of the run (or of each fold), empty dicts where missing or unreadable."""
    out = []
    for folder in run_dirs(run_dir):
        try:
            out.append(json.loads(RunDir(folder).run_info.read_text()))
        except (OSError, ValueError):
            out.append({})
    return out


def split_sizes(run_dir: str | os.PathLike) -> dict[str, int | None]:
    """Train/val/test sizes from the run's split.csv; for cross-validation the mean over folds
    of train and val, and the test images of all folds together (each scored once)."""
    import pandas as pd

    sizes: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for folder in run_dirs(run_dir):
        path = RunDir(folder).split
        if path.is_file():
            counts = pd.read_csv(path, usecols=["split"], dtype=str, keep_default_na=False)["split"].value_counts()
            for key in sizes:
                sizes[key].append(int(counts.get(key, 0)))
    if not sizes["train"]:
        return {"n_train": None, "n_val": None, "n_test": None}
    return {"n_train": round(sum(sizes["train"]) / len(sizes["train"])),
            "n_val": round(sum(sizes["val"]) / len(sizes["val"])),
            "n_test": sum(sizes["test"]) if len(sizes["test"]) > 1 else sizes["test"][0]}


def headline_scores(metrics: Mapping[str, Any], summary: Mapping[str, Any] | None = None,
                    keys: Sequence[str] = SCALAR_FIELDS) -> dict[str, float | None]:
    """``{key: value, key_sd: sd}`` of an evaluation's metrics: for cross-validation (``summary``,
    by default ``metrics["cv"]``) the mean and sd over folds, else the value and None."""
    summary = summary if summary is not None else metrics.get("cv")
    out: dict[str, float | None] = {}
    for key in keys:
        out[key] = as_number(metrics.get(key))
        out[f"{key}_sd"] = None
        stats = ((summary or {}).get("metrics") or {}).get(key) or {}
        if stats.get("mean") is not None:
            out[key] = as_number(stats["mean"])
            out[f"{key}_sd"] = as_number(stats.get("sd"))
    return out


def build_record(cfg, metrics: Mapping[str, Any], *, no_tta: Mapping[str, Any] | None = None,
                 tta: Mapping[str, Any] | None = None, parameters: Mapping[str, Any] | None = None,
                 summary: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The metrics.json record of one experiment.

    ``metrics``: ``evaluate.evaluate_experiment(...).metrics`` on the held-out data with the
    config's ``tta`` setting (for cross-validation the pooled out-of-fold predictions, with
    ``metrics["cv"]``); the headline numbers of a cross-validated experiment are the fold
    means, with ``<metric>_sd``. ``no_tta`` / ``tta``: the same checkpoint(s) scored without and
    with test-time augmentation, kept as ``record["no_tta"]`` / ``record["tta"]`` (accuracy,
    balanced accuracy, macro-F1) for the ablation table. ``parameters``: the experiment's
    parameters before the profile (``notebook_display.notebook_parameters``), kept in the
    provenance so ablations are compared on what they asked for. Training time,
    initialisation and provenance come from the run's run_info.json files.
    """
    from bloodcell_lib.core.provenance import git_commit, machine_info, package_versions

    run_dir = Path(cfg.run_dir)
    infos = run_infos(run_dir)
    summary = summary if summary is not None else metrics.get("cv")
    per_class = metrics.get("per_class", {}) or {}
    record: dict[str, Any] = {
        "name": cfg.name,
        "title": cfg.title or cfg.name,
        "ablation_of": cfg.ablation_of,
        "dataset": cfg.dataset,
        "split": split_description(cfg),
        "crop": cfg.crop,
        "model": cfg.model,
        "image_size": cfg.image_size,
        "epochs": cfg.epochs,
        "cv_folds": cfg.cv_folds,
        **split_sizes(run_dir),
        "n_evaluated": metrics.get("n"),
        "class_names": list(metrics.get("class_names") or per_class),
        **headline_scores(metrics, summary),
    }
    if summary:
        record["folds"] = summary.get("n_folds")
    for key, variant in (("no_tta", no_tta), ("tta", tta)):
        if variant is not None:
            record[key] = headline_scores(variant, keys=("accuracy", "balanced_accuracy", "macro_f1"))
    record["per_class_f1"] = {name: as_number(values.get("f1")) for name, values in per_class.items()}
    if summary and summary.get("per_class_f1"):
        record["per_class_f1"] = {name: as_number(v.get("mean")) for name, v in summary["per_class_f1"].items()}
    record["pooled"] = {key: as_number(metrics.get(key)) for key in SCALAR_FIELDS} if summary else None
    record["confusion_matrix"] = metrics.get("confusion_matrix")
    seconds = [(i.get("timings") or {}).get("train_seconds") for i in infos]
    record["train_seconds"] = round(sum(float(s) for s in seconds), 2) if all(s is not None for s in seconds) else None
    record["total_seconds"] = None  # set by run_all: wall time of the experiment's three notebooks
    record["profile"] = cfg.profile
    used = [(i.get("pretrained") or {}).get("used") for i in infos]
    record["pretrained_requested"] = bool(cfg.pretrained)
    record["pretrained_used"] = bool(all(used)) if used and all(u is not None for u in used) else None
    record["init_note"] = init_message(cfg.pretrained, bool(record["pretrained_used"]), cfg.model)
    first = infos[0] if infos else {}
    record["provenance"] = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.to_dict(),
        "parameters": dict(parameters) if parameters is not None else None,
        "seed": cfg.seed,
        "run_dir": str(run_dir),
        "split_sha256": [i.get("split_sha256") for i in infos] if len(infos) > 1 else first.get("split_sha256"),
        "checkpoint_epoch": metrics.get("checkpoint_epoch"),
        "tta": metrics.get("tta"),
        "git": first.get("git") or git_commit(),
        "packages": first.get("packages") or package_versions(),
        "machine": first.get("machine") or machine_info(),
    }
    if extra:
        record.update(extra)
    return record


def write_record(record: Mapping[str, Any], name: str | None = None) -> Path:
    """``REPORTS_DIR/<experiment>/record.json`` (run_all gathers these into metrics.json)."""
    return atomic_write_json(experiment_dir(name or record["name"]) / RECORD_FILE, dict(record))


def load_records(root: str | os.PathLike | None = None, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Every ``<root>/<experiment>/record.json`` (or only ``names``, in that order)."""
    root = Path(root) if root is not None else reports_dir()
    if names is None:
        paths = sorted(root.glob(f"*/{RECORD_FILE}"))
    else:
        paths = [root / n / RECORD_FILE for n in names if (root / n / RECORD_FILE).is_file()]
    return [json.loads(p.read_text()) for p in paths]


def record_origin(record: Mapping[str, Any]) -> str:
    """'commit 0e2c636 of 2026-12-02' from a record's provenance (the build that made it)."""
    provenance = record.get("provenance") or {}
    git = provenance.get("git") or {}
    commit = str(git.get("commit") or "")[:7] or "an unknown commit"
    dirty = " with uncommitted changes" if git.get("dirty") else ""
    created = str(provenance.get("created") or "")[:10]
    return f"commit {commit}{dirty}" + (f" of {created}" if created else "")


def left_out_note(document: Mapping[str, Any], name: str, record: Mapping[str, Any] | None = None) -> str | None:
    """Why run_all.sh left experiment ``name`` out of this build (metrics.json ``left_out``) and
    where the numbers shown for it come from; None when the build ran it."""
    why = (document.get("left_out") or {}).get(name)
    if why is None:
        return None
    if record is None:
        return f"{why} (no earlier record)"
    return f"{why} (numbers from an earlier build: {record_origin(record)})"


def run_config(record: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a record's run used (after the profile); the record's own fields when it
    carries no provenance config."""
    return dict((record.get("provenance") or {}).get("config") or record)


