"""What a report says: one record per experiment, metrics.json, the tables (experiments beside
the published references, the targets and whether each is met, the ablations) and
reports/index.html.

* **Records** -- one JSON record per experiment (``build_record`` / ``write_record``, written
  by 03_evaluate into ``REPORTS_DIR/<experiment>/record.json``); ``load_records``.
* **metrics.json** -- ``metrics_document``: every record, the published reference numbers
  (``REFERENCES``), ``targets`` (``targets_table`` against ``TARGETS``) and ``ablation``
  (``ablation_table``: test-time augmentation off / on, each ablation experiment against the
  experiment it varies, and the training-path benchmark of benchmarks/throughput.py).
* **Tables and index.html** -- ``comparison_table``, ``targets_frame``, ``ablation_frame``
  (display text), ``render_index`` / ``write_index``.

``bloodcell report [REPORTS_DIR]`` rebuilds metrics.json and index.html
from the records. Building the reports folder is ``bloodcell_lib.build.runner`` (``bloodcell build``, run_all.sh); the
notebooks' display helpers are ``bloodcell_lib.reporting.notebook_display``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import html
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from bloodcell_lib.core.fileio import atomic_write_json, atomic_write_text
from bloodcell_lib.core.paths import PROJECT_ROOT
from bloodcell_lib.modeling.rundir import RunDir

EXPERIMENT_NOTEBOOKS = ("01_explore", "02_train", "03_evaluate")
REPORT_NOTEBOOK = "04_report"
RECORD_FILE = "record.json"
METRICS_FILE = "metrics.json"
INDEX_FILE = "index.html"
FIGURES_DIR = "figures"
STUDENT_ACCURACY = 0.714

# Published numbers quoted in ../shared/data/README.md (and the student project's own result),
# shown as labelled reference rows next to this project's experiments. ``accuracy`` is the
# number compared; ``accuracy_low`` marks a range.
REFERENCES: list[dict[str, Any]] = [
    {"label": "Student project (the study this repeats)", "dataset": "bccd", "split": "hold-out",
     "model": "resnet34", "image_size": None, "accuracy": STUDENT_ACCURACY,
     "source": "student report: ~336 BCCD images, CSV of path and label, oversampled minority classes"},
    {"label": "BCCD: always answer NEUTROPHIL", "dataset": "bccd", "split": "all 4-class images",
     "model": "majority class", "image_size": None, "accuracy": 0.595,
     "source": "../shared/data/README.md (207 of 348 single-label 4-class images)"},
    {"label": "Kaggle TEST: typical published", "dataset": "kaggle", "split": "official TEST",
     "model": "various CNNs", "image_size": None, "accuracy": 0.89, "accuracy_low": 0.85,
     "source": "../shared/data/README.md (85-89 % typical)"},
    {"label": "Kaggle TEST: EfficientNet-B4 + TTA", "dataset": "kaggle", "split": "official TEST",
     "model": "efficientnet_b4 + TTA", "image_size": None, "accuracy": 0.89,
     "source": "../shared/data/README.md (~0.89)"},
    {"label": "PBC / BloodMNIST: ResNet-18", "dataset": "pbc", "split": "official 7:1:2",
     "model": "resnet18", "image_size": 224, "accuracy": 0.963,
     "source": "MedMNIST v2 (../shared/data/README.md)"},
    {"label": "PBC / BloodMNIST: Google AutoML Vision", "dataset": "pbc", "split": "official 7:1:2",
     "model": "AutoML Vision", "image_size": None, "accuracy": 0.966,
     "source": "MedMNIST v2 (../shared/data/README.md)"},
    {"label": "PBC / MedMNIST+: ResNet-18 end-to-end (128 px)", "dataset": "pbc", "split": "official 7:1:2",
     "model": "resnet18", "image_size": 128, "accuracy": 0.983,
     "source": "MedMNIST+ (../shared/data/README.md)"},
    {"label": "PBC / MedMNIST+: ResNet-18 end-to-end (224 px)", "dataset": "pbc", "split": "official 7:1:2",
     "model": "resnet18", "image_size": 224, "accuracy": 0.989,
     "source": "MedMNIST+ (../shared/data/README.md)"},
    {"label": "PBC / MedMNIST+: DenseNet-121 (224 px, best)", "dataset": "pbc", "split": "official 7:1:2",
     "model": "densenet121", "image_size": 224, "accuracy": 0.990,
     "source": "MedMNIST+ (../shared/data/README.md)"},
]

# Fields every metrics.json record carries (tests and readers rely on these names).
RECORD_FIELDS = ("name", "title", "dataset", "split", "model", "image_size", "epochs", "n_train", "n_val",
                 "n_test", "accuracy", "balanced_accuracy", "macro_f1", "per_class_f1", "roc_auc_ovr", "ece",
                 "train_seconds", "total_seconds", "profile", "pretrained_used", "provenance")
SCALAR_FIELDS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_ovr", "ece")

# The study's targets (issue "Beat the published accuracy on every data set"): each names the
# experiment whose record holds the number, the metric, the threshold and the published
# numbers it must beat. ``requires``: settings the experiment must have run with for the
# number to mean what the target says. The last target is the whole build's wall-clock time.
BUILD_TIME_LIMIT_SECONDS = 45 * 60
TARGETS: list[dict[str, Any]] = [
    {"target": "BCCD subtypes, 5-fold CV mean: accuracy", "experiment": "bccd", "metric": "accuracy",
     "op": ">=", "threshold": 0.90, "requires": {"dataset": "bccd", "cv_folds": 5},
     "published": "student 0.714; always-NEUTROPHIL 0.595"},
    {"target": "BCCD subtypes, 5-fold CV mean: macro-F1", "experiment": "bccd", "metric": "macro_f1",
     "op": ">=", "threshold": 0.80, "requires": {"dataset": "bccd", "cv_folds": 5},
     "published": "student 0.714; always-NEUTROPHIL 0.595"},
    {"target": "Kaggle dataset2, official TEST: accuracy", "experiment": "kaggle", "metric": "accuracy",
     "op": ">=", "threshold": 0.92, "requires": {"dataset": "kaggle"},
     "published": "0.85-0.89 typical; EfficientNet-B4 + TTA ~0.89"},
    {"target": "PBC 8 classes, 70/10/20: accuracy", "experiment": "pbc", "metric": "accuracy",
     "op": ">=", "threshold": 0.985,
     "requires": {"dataset": "pbc", "cv_folds": 0, "val_fraction": 0.1, "test_fraction": 0.2, "drop_classes": []},
     "published": "BloodMNIST ResNet-18 0.963, AutoML 0.966; MedMNIST+ ResNet-18 0.983 (128 px), "
                  "best 0.990 (224 px)"},
    {"target": "PBC 8 classes, 70/10/20: macro-F1", "experiment": "pbc", "metric": "macro_f1",
     "op": ">=", "threshold": 0.98,
     "requires": {"dataset": "pbc", "cv_folds": 0, "val_fraction": 0.1, "test_fraction": 0.2, "drop_classes": []},
     "published": "BloodMNIST ResNet-18 0.963, AutoML 0.966; MedMNIST+ ResNet-18 0.983 (128 px), "
                  "best 0.990 (224 px)"},
    {"target": "Whole ./run_all.sh, full profile (seed replica included): wall-clock", "experiment": None,
     "metric": "build_seconds", "op": "<=", "threshold": BUILD_TIME_LIMIT_SECONDS, "requires": {},
     "published": "no published number; the project's own limit (45 minutes)"},
]
# Fields of every targets_table / ablation_table row (tests and readers rely on these names).
TARGET_FIELDS = ("target", "experiment", "metric", "op", "threshold", "value", "sd", "met", "status", "published")


# The throughput benchmark's result (benchmarks/throughput.py --out default), read for the
# ablation table's training-path rows when present.
THROUGHPUT_FILE = PROJECT_ROOT / "benchmarks" / "results" / "throughput.json"
THROUGHPUT_FORMAT = "bloodcell-throughput-benchmark"
TRAINING_PATH_FACTOR = ("training path: naive PIL loop vs project path (cache + tensor augmentation + channels_last, "
                        "early stages frozen)")
TTA_FACTOR = "test-time augmentation (8 dihedral views)"
ABLATION_FIELDS = ("experiment", "factor", "setting", "accuracy", "accuracy_sd", "macro_f1", "macro_f1_sd",
                   "train_seconds", "images_per_second", "note")


def reports_dir() -> Path:
    """The reports folder now ($BLOODCELL_REPORTS, read at call time; run_all points kernels
    at its staging folder this way)."""
    return Path(os.environ.get("BLOODCELL_REPORTS", PROJECT_ROOT / "reports")).expanduser().absolute()


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


# =========================================================================== records

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
    document = {
        "format": "bloodcell-metrics",
        "version": 1,
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **info,
        "experiments": [dict(r) for r in records],
        "references": REFERENCES,
    }
    document["targets"] = targets_table(document)
    document["ablation"] = ablation_table(document)
    return document


def format_score(value: Any, sd: Any = None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = f"{value:.{digits}f}"
    if sd is not None and not (isinstance(sd, float) and math.isnan(sd)):
        text += f" \u00b1 {sd:.{digits}f}"
    return text


def _cell_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) >= 1 else f"{value:.1f}"
    return str(value)


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
        rows = [{k: _cell_text(v) for k, v in row.items()} for row in rows]
    frame = pd.DataFrame(rows)
    order = ["row", "experiment", "ablation of", "dataset", "split", "model", "image size", "epochs", "train/val/test",
             "accuracy", "balanced acc.", "macro-F1", "ROC-AUC", "ECE", "init", "train s", "total s", "profile", "source"]
    frame = frame[[c for c in order if c in frame.columns]]
    return frame.fillna("") if formatted else frame


# =========================================================================== targets

def _config(record: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a record's run used (after the profile); the record's own fields when it
    carries no provenance config."""
    return dict((record.get("provenance") or {}).get("config") or record)


def _profile(document: Mapping[str, Any], record: Mapping[str, Any] | None = None) -> str | None:
    return (record or {}).get("profile") or document.get("profile")


def _target_status(target: Mapping[str, Any], document: Mapping[str, Any],
                   records: Mapping[str, Mapping[str, Any]]) -> tuple[float | None, float | None, bool | None, str]:
    """(value, sd, met, status) of one target."""
    sd = None
    if target["experiment"] is None:  # the whole build
        value = as_number(document.get(target["metric"]))
        profile = _profile(document)
        if value is None:
            return None, None, None, "not run (no ./run_all.sh build recorded)"
        if profile != "full":
            return value, None, None, f"not assessed ({profile or 'unknown'} profile)"
        if document.get("kept"):
            return value, None, None, f"not assessed (partial build: {', '.join(document['kept'])} kept from earlier)"
        if document.get("build_finished") is False and value <= target["threshold"]:
            return value, None, None, "pending (the build was still running; the final time is in index.html)"
    else:
        record = records.get(target["experiment"])
        if record is None:
            return None, None, None, "not run"
        value, sd = as_number(record.get(target["metric"])), as_number(record.get(f"{target['metric']}_sd"))
        profile = _profile(document, record)
        if profile != "full":
            return value, sd, None, f"not assessed ({profile or 'unknown'} profile)"
        config = _config(record)
        wrong = [f"{key} = {json.dumps(want)} (this run: {json.dumps(config.get(key))})"
                 for key, want in target["requires"].items() if config.get(key) != want]
        if wrong:
            return value, sd, None, "not assessed (needs " + "; ".join(wrong) + ")"
        if value is None:
            return None, None, None, f"not assessed (the record has no {target['metric']})"
    met = value >= target["threshold"] if target["op"] == ">=" else value <= target["threshold"]
    return value, sd, met, "MET" if met else "NOT MET"


def targets_table(document: Mapping[str, Any], targets: Sequence[Mapping[str, Any]] = TARGETS) -> list[dict[str, Any]]:
    """One row per target: ``target``, ``experiment`` (None: the whole build), ``metric``,
    ``op``, ``threshold``, ``value`` (``sd``: over folds), ``met`` (True / False / None when not
    assessed), ``status`` (``MET``, ``NOT MET``, ``not run``, ``not assessed (smoke profile)``,
    ...) and ``published``. ``document``: a metrics document (``experiments``, ``profile``,
    ``build_seconds``, ...)."""
    records = {r["name"]: r for r in document.get("experiments", [])}
    rows = []
    for target in targets:
        value, sd, met, status = _target_status(target, document, records)
        rows.append({"target": target["target"], "experiment": target["experiment"], "metric": target["metric"],
                     "op": target["op"], "threshold": target["threshold"], "value": value, "sd": sd, "met": met,
                     "status": status, "published": target["published"]})
    return rows


def _target_text(row: Mapping[str, Any], value: Any, sd: Any = None) -> str:
    if row["metric"] == "build_seconds":
        return "" if value is None else f"{value / 60:.1f} min"
    return format_score(value, sd)


def targets_frame(rows: Sequence[Mapping[str, Any]]):
    """targets_table rows as display text (one DataFrame, used by index.html and 04_report)."""
    import pandas as pd

    symbols = {">=": "\u2265", "<=": "\u2264"}
    out = [{"target": row["target"], "experiment": row["experiment"] or "(whole build)",
            "needed": f"{symbols[row['op']]} {_target_text(row, row['threshold'])}",
            "result": _target_text(row, row["value"], row["sd"]), "status": row["status"],
            "published": row["published"]} for row in rows]
    return pd.DataFrame(out, columns=["target", "experiment", "needed", "result", "status", "published"])


def targets_summary(rows: Sequence[Mapping[str, Any]]) -> str:
    """'2 of 6 targets met, 3 not met, 1 not assessed or not run.'"""
    met = sum(1 for r in rows if r["met"] is True)
    missed = sum(1 for r in rows if r["met"] is False)
    rest = len(rows) - met - missed
    return (f"{met} of {len(rows)} targets met, {missed} not met"
            + (f", {rest} not assessed or not run" if rest else "") + ".")


# =========================================================================== ablation

def _settings_of(record: Mapping[str, Any], parent: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two records' settings to compare: the parameters as the experiments asked for them
    (before the profile) when both records have them, else the configs the runs used."""
    prov, parent_prov = record.get("provenance") or {}, parent.get("provenance") or {}
    if prov.get("parameters") and parent_prov.get("parameters"):
        return dict(prov["parameters"]), dict(parent_prov["parameters"])
    return _config(record), _config(parent)


def changed_settings(record: Mapping[str, Any], parent: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """key -> (this record's value, the parent's) of every setting that differs, in field order;
    names, folders and execution settings (``config.not_factors``) are not factors."""
    from bloodcell_lib.training.config import not_factors

    mine, theirs = _settings_of(record, parent)
    keys = [*mine, *(k for k in theirs if k not in mine)]
    skip = not_factors()
    return {k: (mine.get(k), theirs.get(k)) for k in keys if k not in skip and mine.get(k) != theirs.get(k)}


def _setting_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _scores(source: Mapping[str, Any] | None) -> dict[str, Any]:
    source = source or {}
    return {key: as_number(source.get(key)) for key in ("accuracy", "accuracy_sd", "macro_f1", "macro_f1_sd")}


def _ablation_row(experiment: str | None, factor: str, setting: str, scores: Mapping[str, Any] | None = None, *,
                  train_seconds: Any = None, images_per_second: Any = None, note: str = "") -> dict[str, Any]:
    return {"experiment": experiment, "factor": factor, "setting": setting, **_scores(scores),
            "train_seconds": as_number(train_seconds), "images_per_second": as_number(images_per_second),
            "note": note}


def _tta_rows(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    name, used = record["name"], bool((record.get("provenance") or {}).get("tta"))
    if not record.get("no_tta") or not record.get("tta"):
        return [_ablation_row(name, TTA_FACTOR, "not measured",
                              note="the record has no no_tta / tta scores (rerun 03_evaluate)")]
    return [_ablation_row(name, TTA_FACTOR, setting, record[key], train_seconds=record.get("train_seconds"),
                          note="headline numbers (config tta: " + json.dumps(on) + ")" if on == used else "")
            for key, setting, on in (("no_tta", "off", False), ("tta", "on", True))]


def _variant_rows(record: Mapping[str, Any], parent: Mapping[str, Any]) -> list[dict[str, Any]]:
    changed = changed_settings(record, parent)
    if not changed:
        return [_ablation_row(record["name"], f"(no setting differs from {parent['name']})", "", record,
                              train_seconds=record.get("train_seconds"), note=f"ablation of {parent['name']}")]
    factor = "; ".join(f"{k} {_setting_text(a)} vs {_setting_text(b)}" for k, (a, b) in changed.items())
    mine, theirs = _config(record), _config(parent)
    same = [f"{k} {_setting_text(mine.get(k))}" for k in changed if k in mine and mine.get(k) == theirs.get(k)]
    ran = (f"; under the {record.get('profile')} profile both ran with " + ", ".join(same)) if same else ""
    return [_ablation_row(parent["name"], factor, "; ".join(f"{k} {_setting_text(b)}" for k, (_, b) in changed.items()),
                          parent, train_seconds=parent.get("train_seconds"), note="the experiment varied" + ran),
            _ablation_row(record["name"], factor, "; ".join(f"{k} {_setting_text(a)}" for k, (a, _) in changed.items()),
                          record, train_seconds=record.get("train_seconds"),
                          note=f"ablation of {parent['name']}" + ran)]


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


def _throughput_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    result, why = load_throughput(path)
    if result is None:
        return [_ablation_row("benchmark", TRAINING_PATH_FACTOR, "not measured", note=why)]
    settings, summary, machine = result.get("settings") or {}, result.get("summary") or {}, result.get("machine") or {}
    naive, project = result.get("naive") or {}, result.get("project") or {}
    where = (f"benchmarks/throughput.py of {str(result.get('written', '?'))[:10]} on "
             f"{machine.get('processor') or machine.get('machine') or '?'}, {machine.get('device', '?')}, "
             f"{machine.get('cpus_usable', machine.get('cpu_count', '?'))} CPU(s): {settings.get('model')} at "
             f"{settings.get('image_size')} px, {settings.get('train_images')} train / {settings.get('val_images')} "
             f"val images of {settings.get('dataset')}, {settings.get('epochs')} epochs; accuracy = val accuracy "
             f"of the benchmark, images/s = steady-state training passes")
    busy = "; WARNING: the machine was busy, timings not representative" if result.get("busy_warning") else ""

    def train_seconds(part: Mapping[str, Any]) -> float:
        """Training passes of one run, plus its cache build (the naive loop has none)."""
        return (sum(float(e.get("train_pass_seconds") or 0) for e in (part.get("epochs") or []))
                + float(part.get("cache_seconds") or 0))

    def project_row(part: Mapping[str, Any], what: str, rate_key: str, speedup_key: str) -> dict[str, Any]:
        speedup = as_number(summary.get(speedup_key))
        return _ablation_row("benchmark", TRAINING_PATH_FACTOR,
                             f"project path (cache + tensor augmentation + channels_last, {what})",
                             {"accuracy": part.get("val_acc")}, train_seconds=train_seconds(part),
                             images_per_second=summary.get(rate_key),
                             note=(f"speed-up {speedup:.2f}x" if speedup is not None else "")
                                  + "; train seconds include the cache build" + busy)

    rows = [
        _ablation_row("benchmark", TRAINING_PATH_FACTOR, "naive PIL loop (decode + augment every epoch, NCHW, "
                      "all layers trained)", {"accuracy": naive.get("val_acc")}, train_seconds=train_seconds(naive),
                      images_per_second=summary.get("naive_steady_images_per_second"), note=where + busy),
        project_row(project, trained_layers_text(settings), "project_steady_images_per_second", "speedup_steady"),
    ]
    if result.get("project_all_layers"):
        rows.append(project_row(result["project_all_layers"], "all layers trained",
                                "project_all_layers_steady_images_per_second", "speedup_all_layers_steady"))
    return rows


def ablation_table(document: Mapping[str, Any], *,
                   throughput: str | os.PathLike = THROUGHPUT_FILE) -> list[dict[str, Any]]:
    """Which technique bought which accuracy or speed. Rows ``experiment``, ``factor``,
    ``setting``, ``accuracy`` / ``macro_f1`` (with ``_sd`` over folds), ``train_seconds``,
    ``images_per_second``, ``note``:

    * every main experiment: test-time augmentation off and on (its record's ``no_tta`` and
      ``tta`` scores of the same checkpoint);
    * every ablation experiment (``ablation_of`` names its parent): the parent and the
      ablation, the factor being the settings that differ (``changed_settings``);
    * the training path, naive loop against the project's (from ``throughput``, written by
      benchmarks/throughput.py; a row saying how to make it when absent).
    """
    records = list(document.get("experiments", []))
    by_name = {r["name"]: r for r in records}
    rows: list[dict[str, Any]] = []
    for record in records:
        if record.get("ablation_of"):
            continue
        rows.extend(_tta_rows(record))
        for variant in records:
            if variant.get("ablation_of") == record["name"]:
                rows.extend(_variant_rows(variant, record))
    for variant in records:
        parent = variant.get("ablation_of")
        if parent and parent not in by_name:
            rows.append(_ablation_row(variant["name"], "(parent not run)", "", variant,
                                      train_seconds=variant.get("train_seconds"),
                                      note=f"ablation of {parent}, which has no record in this build"))
        elif parent and by_name[parent].get("ablation_of"):
            rows.extend(_variant_rows(variant, by_name[parent]))
    rows.extend(_throughput_rows(throughput))
    return rows


def ablation_frame(rows: Sequence[Mapping[str, Any]]):
    """ablation_table rows as display text (index.html and 04_report)."""
    import pandas as pd

    out = [{"experiment": row["experiment"], "factor": row["factor"], "setting": row["setting"],
            "accuracy": format_score(row["accuracy"], row["accuracy_sd"]),
            "macro-F1": format_score(row["macro_f1"], row["macro_f1_sd"]),
            "train s": _cell_text(row["train_seconds"]), "images/s": _cell_text(row["images_per_second"]),
            "note": row["note"]} for row in rows]
    return pd.DataFrame(out, columns=["experiment", "factor", "setting", "accuracy", "macro-F1", "train s",
                                      "images/s", "note"])


# =========================================================================== index.html

_INDEX_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1500px;
     padding:0 1em;color:#1f2328}
h1{margin-bottom:.2em} .meta{color:#57606a;margin-top:0}
table{border-collapse:collapse;margin:1em 0;font-size:.9em} th,td{border:1px solid #d0d7de;padding:4px 8px;
     text-align:left;vertical-align:top} th{background:#f6f8fa} tr.reference td{color:#57606a;font-style:italic}
.warn{background:#fff8c5;border:1px solid #d4a72c;padding:.6em 1em;border-radius:6px}
.cards{display:flex;flex-wrap:wrap;gap:1em} .card{border:1px solid #d0d7de;border-radius:6px;padding:.8em;
     width:360px} .card img{max-width:100%;height:auto;display:block;margin:.4em 0}
figure{margin:.5em 0} figcaption{font-size:.85em;color:#57606a}
code{background:#f6f8fa;padding:0 .2em}
.ablation-of{color:#57606a;font-size:.9em}
td.status{font-weight:bold} tr.met td.status{color:#1a7f37} tr.not-met td.status{color:#cf222e}
tr.open td.status{color:#57606a;font-weight:normal}
"""


def _rel(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def _link(path: Path, root: Path, text: str) -> str:
    if not path.exists():
        return ""
    return f'<a href="{html.escape(_rel(path, root), quote=True)}">{html.escape(text)}</a>'


def _caption(png: Path) -> str:
    """'2-confusion-matrix.png' -> 'confusion matrix' (the number only orders the figures)."""
    return re.sub(r"^\d+-", "", png.stem).replace("-", " ")


def _html_table(frame, row_classes: Sequence[str] | None = None, cell_classes: Mapping[str, str] | None = None) -> str:
    """A DataFrame of display text as an HTML table (``row_classes``: one class per row;
    ``cell_classes``: column -> class of its cells)."""
    cell_classes = cell_classes or {}
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for i, (_, row) in enumerate(frame.iterrows()):
        cls = f" class='{row_classes[i]}'" if row_classes else ""
        cells = "".join(f"<td{' class=' + repr(cell_classes[c]) if c in cell_classes else ''}>"
                        f"{html.escape('' if row[c] is None else str(row[c]))}</td>" for c in frame.columns)
        body.append(f"<tr{cls}>{cells}</tr>")
    return (f"<div style='overflow-x:auto'><table><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")


def render_index(root: str | os.PathLike, document: Mapping[str, Any]) -> str:
    """reports/index.html from a metrics document: the targets (met or not, beside the
    published numbers), the comparison table with links to every notebook (HTML and .ipynb),
    the ablation table, the report, metrics.json and the key figures of each experiment."""
    root = Path(root)
    records = document.get("experiments", [])
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
             f"<title>bloodcell reports</title><style>{_INDEX_CSS}</style></head><body>",
             "<h1>bloodcell: white-blood-cell classification reports</h1>"]
    meta = [f"generated {html.escape(str(document.get('generated', _dt.datetime.now().isoformat(timespec='seconds'))))}"]
    if document.get("build_seconds") is not None:
        meta.append(f"built in {document['build_seconds'] / 60:.1f} min")
    if document.get("profile"):
        meta.append(f"profile <b>{html.escape(str(document['profile']))}</b>")
    git = document.get("git") or {}
    if git.get("commit"):
        meta.append(f"commit <code>{html.escape(git['commit'][:12])}</code>{' (uncommitted changes)' if git.get('dirty') else ''}")
    parts.append(f"<p class='meta'>{' &middot; '.join(meta)}</p>")
    if document.get("profile") == "smoke" or any(r.get("profile") == "smoke" for r in records):
        parts.append("<p class='warn'><b>Smoke profile:</b> tiny subsets, one epoch, low resolution. These numbers "
                     "only prove that the pipeline runs; they say nothing about accuracy.</p>")
    for r in records:
        if r.get("init_note") and r.get("pretrained_requested"):
            parts.append(f"<p class='warn'><b>{html.escape(r['name'])}: {html.escape(r['init_note'])}</b></p>")
    links = [_link(root / f"{REPORT_NOTEBOOK}.html", root, "Comparison report (04_report)"),
             _link(root / METRICS_FILE, root, "metrics.json")]
    parts.append("<p>" + " &middot; ".join(l for l in links if l) + "</p>")

    targets = document["targets"]
    parts.append(f"<h2>Targets</h2><p>{html.escape(targets_summary(targets))}</p>")
    classes = ["met" if t["met"] else "not-met" if t["met"] is False else "open" for t in targets]
    parts.append(_html_table(targets_frame(targets), classes, {"status": "status"}))

    # comparison table, with links per experiment
    parts.append("<h2>Experiments and published references</h2><div style='overflow-x:auto'><table><thead><tr>")
    cols = ["experiment", "dataset", "split", "model", "image size", "epochs", "train/val/test", "accuracy",
            "balanced acc.", "macro-F1", "ROC-AUC", "ECE", "init", "train s", "total s", "profile", "notebooks"]
    parts.append("".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr></thead><tbody>")
    table = comparison_table(records)
    for _, row in table.iterrows():
        cells = []
        for c in cols[:-1]:
            value = row.get(c, "")
            cells.append(f"<td>{html.escape('' if value is None else str(value))}</td>")
        if row["row"] != "reference":
            name = str(row["experiment"])
            if row["row"] == "ablation":
                cells[0] = (f"<td>{html.escape(name)}<br><span class='ablation-of'>ablation of "
                            f"{html.escape(str(row['ablation of']))}</span></td>")
            nb_links = []
            for nb in EXPERIMENT_NOTEBOOKS:
                h = _link(root / name / f"{nb}.html", root, nb)
                if h:
                    nb_links.append(h + " (" + _link(root / name / f"{nb}.ipynb", root, "ipynb") + ")")
            cells.append(f"<td>{'<br>'.join(nb_links)}</td>")
            parts.append(f"<tr class='{row['row']}'>{''.join(cells)}</tr>")
        else:
            cells.append(f"<td>{html.escape(str(row.get('source', '')))}</td>")
            parts.append(f"<tr class='reference'>{''.join(cells)}</tr>")
    parts.append("</tbody></table></div>")
    parts.append("<p>Reference rows (grey, italic) are published numbers quoted from "
                 "<code>../shared/data/README.md</code> and the student project's hold-out accuracy; they come "
                 "from other splits and set-ups and are context, not a like-for-like comparison.</p>")

    ablation = document["ablation"]
    parts.append("<h2>Ablation</h2><p>Which technique bought which accuracy or speed: test-time augmentation off "
                 "and on for each experiment, each ablation experiment beside the experiment it varies, and the "
                 "training path (benchmarks/throughput.py).</p>")
    parts.append(_html_table(ablation_frame(ablation)))

    summary_figs = sorted((root / FIGURES_DIR).glob("*.png"))
    if summary_figs:
        parts.append("<h2>Summary</h2><div class='cards'>")
        for fig in summary_figs:
            caption = _caption(fig)
            parts.append(f"<div class='card'><figure><a href='{html.escape(_rel(fig, root))}'>"
                         f"<img src='{html.escape(_rel(fig, root))}' alt='{html.escape(caption)}'></a>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure></div>")
        parts.append("</div>")

    parts.append("<h2>Key figures per experiment</h2><div class='cards'>")
    for r in records:
        name = r["name"]
        figs = sorted((root / name / FIGURES_DIR).glob("*.png"))
        items = [f"<div class='card'><h3>{html.escape(name)}</h3><p>{html.escape(str(r.get('title') or ''))}</p>"]
        for fig in figs:
            caption = _caption(fig)
            items.append(f"<figure><a href='{html.escape(_rel(fig, root))}'><img src='{html.escape(_rel(fig, root))}' "
                         f"alt='{html.escape(name + ': ' + caption)}' loading='eager'></a>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        items.append("</div>")
        parts.append("".join(items))
    parts.append("</div>")
    parts.append("<p class='meta'>Rebuild with <code>./run_all.sh</code> (see reports/README.md).</p></body></html>")
    return "\n".join(parts)


def write_index(root: str | os.PathLike, document: Mapping[str, Any]) -> Path:
    return atomic_write_text(Path(root) / INDEX_FILE, render_index(root, document))


# =========================================================================== command line

def main(argv: Sequence[str]) -> int:
    """``bloodcell report [REPORTS_DIR]``: rebuild metrics.json and index.html from the records."""
    parser = argparse.ArgumentParser(prog="bloodcell report",
                                     description="Rebuild metrics.json and index.html from the experiments' records.")
    parser.add_argument("reports_dir", nargs="?", type=Path, default=None,
                        help="the reports folder (default: $BLOODCELL_REPORTS or reports/)")
    root = parser.parse_args(list(argv)).reports_dir or reports_dir()
    # Keep what only the build knew (profile, git, build_seconds, ...); recompute the rest,
    # e.g. after a newer benchmarks/results/throughput.json.
    previous = load_metrics(root)
    derived = {"format", "version", "generated", "experiments", "references", "targets", "ablation"}
    document = metrics_document(load_records(root), **{k: v for k, v in previous.items() if k not in derived})
    atomic_write_json(root / METRICS_FILE, document)
    print(write_index(root, document))
    return 0
