"""Reports: what the notebooks show, what they record, and how run_all.sh builds reports/.

Three layers, used from top to bottom of a study:

* **Notebook helpers** -- ``notebook_config`` (parameters cell -> TrainConfig),
  ``show_figure`` (a matplotlib figure as an HTML ``<figure>`` with alt text and caption,
  optionally saved as PNG for the index page), ``show_table``, ``show_markdown``,
  ``show_warning``. They keep the notebooks thin.
* **Records** -- one JSON record per experiment (``build_record`` / ``write_record``, written
  by 03_evaluate into ``REPORTS_DIR/<experiment>/record.json``), the published reference
  numbers (``REFERENCES``), the side-by-side table (``comparison_table``), ``metrics.json``
  and ``index.html``.
* **run_all** -- ``python -m bloodcell_lib.reporting run-all`` (what ``run_all.sh`` calls):
  executes 01-03 of every experiment and 04 once with papermill and the ``bloodcell`` kernel
  into a staging folder beside reports/, converts each to HTML (code hidden), writes
  metrics.json and index.html, then swaps the staging folder in with one atomic rename. A
  lock (``reports/.lock``) keeps two builds apart.

``python -m bloodcell_lib.reporting screenshot reports/index.html docs/report-screenshot.png``
renders a page with headless Chromium (playwright).
"""
from __future__ import annotations

import argparse
import base64
import ctypes
import datetime as _dt
import errno
import html
import io
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import warnings

from .fileio import atomic_write_json, atomic_write_text
from .paths import EXPERIMENTS_DIR, NOTEBOOKS_DIR, PROJECT_ROOT

# huggingface_hub (imported by timm) imports tqdm.auto, which inside Jupyter warns that
# ipywidgets is missing and falls back to plain tqdm -- the project's choice anyway. The
# notebooks import this module first so that warning does not clutter the reports.
warnings.filterwarnings("ignore", message="IProgress not found")

KERNEL_NAME = "bloodcell"
EXPERIMENT_NOTEBOOKS = ("01_explore", "02_train", "03_evaluate")
REPORT_NOTEBOOK = "04_report"
NOTEBOOK_TITLES = {
    "01_explore": "Data exploration and audit",
    "02_train": "Training",
    "03_evaluate": "Evaluation on the held-out set",
    "04_report": "All experiments side by side",
}
RECORD_FILE = "record.json"
METRICS_FILE = "metrics.json"
INDEX_FILE = "index.html"
LOCK_FILE = ".lock"
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


def reports_dir() -> Path:
    """The reports folder now ($BLOODCELL_REPORTS, read at call time; run_all points kernels
    at its staging folder this way)."""
    return Path(os.environ.get("BLOODCELL_REPORTS", PROJECT_ROOT / "reports")).expanduser().absolute()


def experiment_dir(name: str) -> Path:
    return reports_dir() / name


def figure_dir(name: str | None = None) -> Path:
    """Where a notebook saves the PNG copies of its key figures (used by index.html)."""
    return (experiment_dir(name) if name else reports_dir()) / FIGURES_DIR


# =========================================================================== notebook helpers

def notebook_config(namespace: Mapping[str, Any]):
    """TrainConfig from a notebook's globals: every TrainConfig field found there (the
    parameters cell plus what papermill injected); the profile is applied and the whole
    config validated (ConfigError names the bad parameter)."""
    from .config import FIELD_NAMES, make_config

    params = {key: namespace[key] for key in FIELD_NAMES if key in namespace}
    return make_config(params)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "figure"


def figure_png(fig, dpi: int = 110) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def figure_html(png: bytes, alt: str, caption: str | None = None) -> str:
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return (f'<figure class="bloodcell-figure" style="margin:0.5em 0">'
            f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt, quote=True)}" '
            f'style="max-width:100%;height:auto">{cap}</figure>')


def show_figure(fig, alt: str, caption: str | None = None, *, save_as: str | os.PathLike | None = None,
                dpi: int = 110) -> None:
    """Display ``fig`` as an HTML figure with alt text and caption (both end up in the HTML
    report), optionally save it as PNG (``save_as``: a path, ``.png`` added when it has no
    suffix), and close it. Returns None, so a call ending a cell prints nothing more."""
    import matplotlib.pyplot as plt
    from IPython.display import HTML, display

    png = figure_png(fig, dpi=dpi)
    plt.close(fig)
    saved = None
    if save_as is not None:
        saved = Path(save_as)
        if not saved.suffix:
            saved = saved.with_suffix(".png")
        from .fileio import atomic_write_bytes

        atomic_write_bytes(saved, png)
    display(HTML(figure_html(png, alt, caption)))


def show_table(frame, caption: str | None = None, *, float_format: str = "{:.3f}", index: bool = False) -> None:
    """A DataFrame as an HTML table with a caption (numbers rounded for reading)."""
    import pandas as pd
    from IPython.display import HTML, display

    frame = frame.copy()
    for column in frame.columns:
        if pd.api.types.is_float_dtype(frame[column]):
            frame[column] = frame[column].map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v))
                                              else float_format.format(v))
    table = frame.to_html(index=index, escape=True, border=0, classes="bloodcell-table", na_rep="")
    cap = f"<p><b>{html.escape(caption)}</b></p>" if caption else ""
    display(HTML(cap + table))


def show_markdown(text: str) -> None:
    from IPython.display import Markdown, display

    display(Markdown(text))


def show_warning(text: str) -> None:
    """A bold warning line (Markdown), e.g. a model trained from random initialisation."""
    show_markdown(f"**{text}**")


def init_message(pretrained_requested: bool, pretrained_used: bool, model: str) -> str | None:
    """The sentence the reports print when ImageNet weights were asked for but unavailable."""
    if pretrained_requested and not pretrained_used:
        return (f"Trained from random initialisation: ImageNet weights for {model} were unavailable "
                f"(no network and no local copy), so this model did not start from pretrained weights.")
    if not pretrained_requested:
        return f"Trained from random initialisation (pretrained = false) for {model}."
    return None


# --------------------------------------------------------------------------- notebook tables

def header_markdown(cfg, notebook: str) -> str:
    """The heading a notebook prints under its static title: experiment, data, model, profile."""
    lines = [f"## {cfg.title or cfg.name}",
             f"Experiment **{cfg.name}** \u00b7 data set **{cfg.dataset}**"
             + (f" (crop {cfg.crop})" if cfg.crop != "none" else "")
             + f" \u00b7 model **{cfg.model}** at {cfg.image_size} px \u00b7 {cfg.epochs} epoch(s)"
             + (f" \u00b7 {cfg.cv_folds}-fold CV" if cfg.cv_folds else "")
             + f" \u00b7 seed {cfg.seed} \u00b7 profile **{cfg.profile}**"]
    if cfg.profile == "smoke":
        lines.append("*Smoke profile: a tiny subset, one epoch, low resolution. It proves the pipeline runs; "
                     "its numbers mean nothing.*")
    lines.append(f"Notebook: {NOTEBOOK_TITLES.get(notebook, notebook)}. Run directory: `{cfg.run_dir}`.")
    return "\n\n".join(lines)


def config_table(cfg):
    """Parameter/value table of the whole config (what the run used, after the profile)."""
    import pandas as pd

    from .config import TrainConfig

    defaults = TrainConfig().to_dict()
    rows = [{"parameter": k, "value": repr(v) if isinstance(v, str) else str(v),
             "default": "" if v != defaults.get(k) else "yes"} for k, v in cfg.to_dict().items()]
    return pd.DataFrame(rows)


def counts_table(table):
    """Images per class (rows) and split (columns), with totals."""
    import pandas as pd

    split = table["split"].fillna("").astype(str).replace("", "all")
    counts = pd.crosstab(table["label"].astype(str), split, margins=True, margins_name="total")
    order = [c for c in ("train", "val", "test", "test_simple", "all") if c in counts.columns]
    rest = [c for c in counts.columns if c not in order and c != "total"]
    return counts[order + rest + ["total"]].rename_axis(index="class", columns=None).reset_index()


def leakage_table(table):
    """Leakage groups (byte-identical files, crops of one image) that fall in more than one
    split of ``table``; empty when the split is clean."""
    import pandas as pd

    split = table["split"].fillna("").astype(str)
    per_group = split.groupby(table["group"]).nunique()
    bad = per_group[per_group > 1].index
    rows = []
    for group in bad:
        members = table[table["group"] == group]
        rows.append({"group": group, "splits": ", ".join(sorted(set(members["split"].astype(str)))),
                     "labels": ", ".join(sorted(set(members["label"].astype(str)))),
                     "files": ", ".join(sorted({Path(p).name for p in members["path"]}))})
    return pd.DataFrame(rows, columns=["group", "splits", "labels", "files"])


def duplicates_table(duplicates: Sequence[Mapping[str, Any]]):
    """One row per set of byte-identical files (``Manifest.duplicates`` / the audit's)."""
    import pandas as pd

    rows = [{"group": d.get("group"), "files": len(d.get("paths", [])),
             "labels": ", ".join(sorted(set(map(str, d.get("labels", []))))),
             "different labels": "yes (dropped)" if d.get("cross_class") else "no",
             "paths": "; ".join(Path(p).name for p in d.get("paths", []))} for d in duplicates]
    return pd.DataFrame(rows, columns=["group", "files", "labels", "different labels", "paths"])


def metrics_table(metrics: Mapping[str, Any]):
    """Headline metrics of an evaluation; for cross-validation mean \u00b1 sd over folds and
    the pooled out-of-fold value."""
    import pandas as pd

    names = {"accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro-F1",
             "weighted_f1": "weighted F1", "roc_auc_ovr": "ROC-AUC (one-vs-rest, macro)",
             "ece": "ECE (15 bins)", "log_loss": "log loss"}
    cv = (metrics.get("cv") or {}).get("metrics") or {}
    rows = []
    for key, label in names.items():
        row = {"metric": label}
        if cv:
            stats = cv.get(key) or {}
            row["mean over folds"] = _fmt(stats.get("mean"), stats.get("sd"))
            row["pooled out-of-fold"] = _fmt(_num(metrics.get(key)))
        else:
            row["value"] = _fmt(_num(metrics.get(key)))
        rows.append(row)
    rows.append({"metric": "images scored", **({"mean over folds": "", "pooled out-of-fold": str(metrics.get("n"))}
                                             if cv else {"value": str(metrics.get("n"))})})
    return pd.DataFrame(rows)


def per_class_table(metrics: Mapping[str, Any]):
    import pandas as pd

    rows = [{"class": name, "precision": v.get("precision"), "recall": v.get("recall"), "F1": v.get("f1"),
             "ROC-AUC": v.get("roc_auc"), "support": v.get("support")}
            for name, v in (metrics.get("per_class") or {}).items()]
    return pd.DataFrame(rows, columns=["class", "precision", "recall", "F1", "ROC-AUC", "support"])


def save_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_json(path, obj)


def frame(rows: Sequence[Mapping[str, Any]]):
    import pandas as pd

    return pd.DataFrame(list(rows))


def run_files_markdown(cfg) -> str:
    """Where training left its files (what 03_evaluate and --resume read)."""
    lines = [f"Run directory `{cfg.run_dir}`:"]
    for folder in run_dirs(cfg.run_dir):
        files = [n for n in ("checkpoint_best.pt", "checkpoint_last.pt", "history.csv", "split.csv", "config.yaml",
                             "run_info.json") if (folder / n).is_file()]
        where = folder.name if folder != Path(cfg.run_dir) else "."
        lines.append(f"- `{where}/`: " + ", ".join(f"`{n}`" for n in files))
    return "\n".join(lines)


def report_header_markdown(title: str, records: Sequence[Mapping[str, Any]], profile: str) -> str:
    lines = [f"## {title}", f"{len(records)} experiment(s): " + ", ".join(f"**{r['name']}**" for r in records)]
    if profile == "smoke" or any(r.get("profile") == "smoke" for r in records):
        lines.append("*Smoke profile: tiny subsets, one epoch, low resolution. The numbers only prove that the "
                     "pipeline runs.*")
    for r in records:
        if r.get("pretrained_requested") and r.get("pretrained_used") is False:
            lines.append(f"**{r['name']}: {r.get('init_note') or 'trained from random initialisation'}**")
    return "\n\n".join(lines)


def planned_split(cfg, manifest):
    """The split training uses (the saved run_dir/split.csv when it still matches, else the
    seeded one it will make; fold 1 for cross-validation), without writing anything."""
    from . import splits

    if cfg.cv_folds:
        return splits.splits_for(cfg, manifest, Path(cfg.run_dir) / "fold_0", write=False, fold=0)
    return splits.splits_for(cfg, manifest, cfg.run_dir, write=False)


def training_summary(results: Sequence[Any]):
    """One row per trained model (fold): epochs, best epoch and value, time, init, checkpoint."""
    import pandas as pd

    rows = []
    for r in results:
        rows.append({"fold": "" if r.fold is None else r.fold + 1, "epochs run": r.epochs_run,
                     "best epoch": r.best_epoch, "monitor": r.monitor, "best value": _num(r.best_metric),
                     "stopped early": "yes" if r.stopped_early else "no",
                     "train seconds": round(float(r.train_seconds), 1),
                     "init": "ImageNet weights" if r.pretrained_used else "RANDOM",
                     "checkpoint": str(r.checkpoint_best)})
    return pd.DataFrame(rows)


def init_status(cfg) -> str | None:
    """init_message for a finished run, read from its run_info.json files."""
    used = [(i.get("pretrained") or {}).get("used") for i in run_infos(cfg.run_dir)]
    if not used or any(u is None for u in used):
        return None
    return init_message(cfg.pretrained, all(used), cfg.model)


def gradcam_source(cfg, evaluation) -> tuple[Path, Any]:
    """(checkpoint, prediction rows) for Grad-CAM: the run's best checkpoint, or for
    cross-validation fold 1's checkpoint with the images fold 1 held out."""
    preds = evaluation.predictions
    if "fold" in preds.columns:
        first = sorted(preds["fold"].unique())[0]
        return Path(cfg.run_dir) / f"fold_{first}" / "checkpoint_best.pt", preds[preds["fold"] == first]
    return Path(cfg.run_dir) / "checkpoint_best.pt", preds


def history_for(record: Mapping[str, Any]):
    """history.csv of an experiment's run (fold 1 for cross-validation), or None."""
    import pandas as pd

    run_dir = (record.get("provenance") or {}).get("run_dir")
    if not run_dir:
        return None
    path = run_dirs(run_dir)[0] / "history.csv"
    return pd.read_csv(path) if path.is_file() else None


def plot_comparison(records: Sequence[Mapping[str, Any]], *, references: bool = True):
    """Accuracy, balanced accuracy and macro-F1 per experiment (error bars: sd over folds),
    with each data set's published reference accuracies as labelled ticks."""
    import numpy as np
    from matplotlib.figure import Figure

    names = [r["name"] for r in records]
    fig = Figure(figsize=(max(7.0, 1.9 * len(names) + 3), 4.8), layout="constrained")
    ax = fig.subplots()
    keys = (("accuracy", "accuracy"), ("balanced_accuracy", "balanced acc."), ("macro_f1", "macro-F1"))
    width = 0.8 / len(keys)
    x = np.arange(len(names))
    for i, (key, label) in enumerate(keys):
        values = [r.get(key) if r.get(key) is not None else np.nan for r in records]
        errors = [r.get(f"{key}_sd") or 0.0 for r in records]
        bars = ax.bar(x + (i - 1) * width, values, width, yerr=errors, capsize=3, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    if references:
        for j, r in enumerate(records):
            refs = [ref for ref in REFERENCES if ref["dataset"] == r.get("dataset")]
            for ref in refs:
                ax.hlines(ref["accuracy"], j - 0.45, j + 0.45, colors="black", linestyles=":", linewidth=1)
            if refs:
                lo, hi = min(ref["accuracy"] for ref in refs), max(ref["accuracy"] for ref in refs)
                ax.annotate(f"refs {lo:.2f}-{hi:.2f}" if lo != hi else f"ref {hi:.2f}", (j + 0.45, hi),
                            fontsize=7, ha="right", va="bottom")
    ax.set_xticks(x, [f"{r['name']}\n{r.get('dataset')}, {r.get('model')}" for r in records], fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("score on held-out data")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Held-out scores per experiment (dotted: published references for that data set)")
    return fig


def plot_per_class_f1(records: Sequence[Mapping[str, Any]]):
    """Heatmap of per-class F1: experiments as rows, classes as columns (blank: class absent)."""
    import numpy as np
    from matplotlib.figure import Figure

    classes = sorted({c for r in records for c in (r.get("per_class_f1") or {})})
    data = np.array([[((r.get("per_class_f1") or {}).get(c)) if (r.get("per_class_f1") or {}).get(c) is not None
                      else np.nan for c in classes] for r in records], dtype=float)
    fig = Figure(figsize=(max(6.0, 0.8 * len(classes) + 3), 0.6 * len(records) + 2.2), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(data), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if not np.isnan(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if data[i, j] < 0.6 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(records)), [r["name"] for r in records], fontsize=8)
    fig.colorbar(image, ax=ax, label="F1")
    ax.set_title("Per-class F1 per experiment")
    return fig


# =========================================================================== records

def _num(value: Any) -> float | None:
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
    run_dir = Path(run_dir)
    folds = sorted((p for p in run_dir.glob("fold_*") if p.is_dir() and re.fullmatch(r"fold_\d+", p.name)),
                   key=lambda p: int(p.name.split("_")[1]))
    return folds or [run_dir]


def run_infos(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """run_info.json of the run (or of each fold), empty dicts where missing or unreadable."""
    out = []
    for folder in run_dirs(run_dir):
        try:
            out.append(json.loads((folder / "run_info.json").read_text()))
        except (OSError, ValueError):
            out.append({})
    return out


def split_sizes(run_dir: str | os.PathLike) -> dict[str, int | None]:
    """Train/val/test sizes from the run's split.csv; for cross-validation the mean over folds
    of train and val, and the test images of all folds together (each scored once)."""
    import pandas as pd

    sizes: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for folder in run_dirs(run_dir):
        path = folder / "split.csv"
        if path.is_file():
            counts = pd.read_csv(path, usecols=["split"], dtype=str, keep_default_na=False)["split"].value_counts()
            for key in sizes:
                sizes[key].append(int(counts.get(key, 0)))
    if not sizes["train"]:
        return {"n_train": None, "n_val": None, "n_test": None}
    return {"n_train": round(sum(sizes["train"]) / len(sizes["train"])),
            "n_val": round(sum(sizes["val"]) / len(sizes["val"])),
            "n_test": sum(sizes["test"]) if len(sizes["test"]) > 1 else sizes["test"][0]}


def build_record(cfg, metrics: Mapping[str, Any], *, summary: Mapping[str, Any] | None = None,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The metrics.json record of one experiment.

    ``metrics``: ``evaluate.evaluate_experiment(...).metrics`` on the held-out data (for
    cross-validation the pooled out-of-fold predictions, with ``metrics["cv"]``); the headline
    numbers of a cross-validated experiment are the fold means, with ``<metric>_sd``.
    Training time, initialisation and provenance come from the run's run_info.json files.
    """
    from .provenance import git_commit, machine_info, package_versions

    run_dir = Path(cfg.run_dir)
    infos = run_infos(run_dir)
    summary = summary if summary is not None else metrics.get("cv")
    per_class = metrics.get("per_class", {}) or {}
    record: dict[str, Any] = {
        "name": cfg.name,
        "title": cfg.title or cfg.name,
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
    }
    for key in SCALAR_FIELDS:
        record[key] = _num(metrics.get(key))
        record[f"{key}_sd"] = None
    if summary:
        for key in SCALAR_FIELDS:
            stats = (summary.get("metrics") or {}).get(key) or {}
            if stats.get("mean") is not None:
                record[key] = _num(stats["mean"])
                record[f"{key}_sd"] = _num(stats.get("sd"))
        record["folds"] = summary.get("n_folds")
    record["per_class_f1"] = {name: _num(values.get("f1")) for name, values in per_class.items()}
    if summary and summary.get("per_class_f1"):
        record["per_class_f1"] = {name: _num(v.get("mean")) for name, v in summary["per_class_f1"].items()}
    record["pooled"] = {key: _num(metrics.get(key)) for key in SCALAR_FIELDS} if summary else None
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
    return {
        "format": "bloodcell-metrics",
        "version": 1,
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **info,
        "experiments": [dict(r) for r in records],
        "references": REFERENCES,
    }


def _fmt(value: Any, sd: Any = None, digits: int = 3) -> str:
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


def comparison_table(records: Sequence[Mapping[str, Any]], *, references: bool = True, formatted: bool = True):
    """One row per experiment, then the reference rows (labelled ``reference``)."""
    import pandas as pd

    rows = []
    for r in records:
        row = {
            "row": "experiment", "experiment": r.get("name"), "dataset": r.get("dataset"), "split": r.get("split"),
            "model": r.get("model"), "image size": r.get("image_size"), "epochs": r.get("epochs"),
            "train/val/test": "/".join("" if r.get(k) is None else str(r.get(k)) for k in ("n_train", "n_val", "n_test")),
            "init": ("pretrained" if r.get("pretrained_used") else "RANDOM INIT") if r.get("pretrained_used") is not None else "",
            "profile": r.get("profile"), "train s": r.get("train_seconds"), "total s": r.get("total_seconds"),
        }
        for key, label in (("accuracy", "accuracy"), ("balanced_accuracy", "balanced acc."), ("macro_f1", "macro-F1"),
                           ("roc_auc_ovr", "ROC-AUC"), ("ece", "ECE")):
            row[label] = _fmt(r.get(key), r.get(f"{key}_sd")) if formatted else r.get(key)
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
    order = ["row", "experiment", "dataset", "split", "model", "image size", "epochs", "train/val/test", "accuracy",
             "balanced acc.", "macro-F1", "ROC-AUC", "ECE", "init", "train s", "total s", "profile", "source"]
    frame = frame[[c for c in order if c in frame.columns]]
    return frame.fillna("") if formatted else frame


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


def render_index(root: str | os.PathLike, records: Sequence[Mapping[str, Any]], *, info: Mapping[str, Any] | None = None) -> str:
    """reports/index.html: the comparison table with links to every notebook (HTML and
    .ipynb), the report, metrics.json and the key figures of each experiment."""
    root = Path(root)
    info = dict(info or {})
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
             f"<title>bloodcell reports</title><style>{_INDEX_CSS}</style></head><body>",
             "<h1>bloodcell: white-blood-cell classification reports</h1>"]
    meta = [f"generated {html.escape(str(info.get('generated', _dt.datetime.now().isoformat(timespec='seconds'))))}"]
    if info.get("profile"):
        meta.append(f"profile <b>{html.escape(str(info['profile']))}</b>")
    git = info.get("git") or {}
    if git.get("commit"):
        meta.append(f"commit <code>{html.escape(git['commit'][:12])}</code>{' (uncommitted changes)' if git.get('dirty') else ''}")
    parts.append(f"<p class='meta'>{' &middot; '.join(meta)}</p>")
    if info.get("profile") == "smoke" or any(r.get("profile") == "smoke" for r in records):
        parts.append("<p class='warn'><b>Smoke profile:</b> tiny subsets, one epoch, low resolution. These numbers "
                     "only prove that the pipeline runs; they say nothing about accuracy.</p>")
    for r in records:
        if r.get("init_note") and r.get("pretrained_requested"):
            parts.append(f"<p class='warn'><b>{html.escape(r['name'])}: {html.escape(r['init_note'])}</b></p>")
    links = [_link(root / f"{REPORT_NOTEBOOK}.html", root, "Comparison report (04_report)"),
             _link(root / METRICS_FILE, root, "metrics.json")]
    parts.append("<p>" + " &middot; ".join(l for l in links if l) + "</p>")

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
        if row["row"] == "experiment":
            name = str(row["experiment"])
            nb_links = []
            for nb in EXPERIMENT_NOTEBOOKS:
                h = _link(root / name / f"{nb}.html", root, nb)
                if h:
                    nb_links.append(h + " (" + _link(root / name / f"{nb}.ipynb", root, "ipynb") + ")")
            cells.append(f"<td>{'<br>'.join(nb_links)}</td>")
            parts.append(f"<tr class='experiment'>{''.join(cells)}</tr>")
        else:
            cells.append(f"<td>{html.escape(str(row.get('source', '')))}</td>")
            parts.append(f"<tr class='reference'>{''.join(cells)}</tr>")
    parts.append("</tbody></table></div>")
    parts.append("<p>Reference rows (grey, italic) are published numbers quoted from "
                 "<code>../shared/data/README.md</code> and the student project's hold-out accuracy; they come "
                 "from other splits and set-ups and are context, not a like-for-like comparison.</p>")

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
    if info.get("failed"):
        parts.append(f"<p class='warn'>{html.escape(str(info['failed']))}</p>")
    parts.append("<p class='meta'>Rebuild with <code>./run_all.sh</code> (see reports/README.md).</p></body></html>")
    return "\n".join(parts)


def write_index(root: str | os.PathLike, records: Sequence[Mapping[str, Any]], *, info: Mapping[str, Any] | None = None) -> Path:
    return atomic_write_text(Path(root) / INDEX_FILE, render_index(root, records, info=info))


def experiment_links(name: str, *, base: str | os.PathLike | None = None, root: str | os.PathLike | None = None) -> str:
    """Markdown links to an experiment's HTML notebooks, relative to ``base`` (default: the
    current folder, which run_all sets to where the notebook's HTML is written)."""
    root = Path(root) if root is not None else reports_dir()
    base = Path(base) if base is not None else Path.cwd()
    links = []
    for nb in EXPERIMENT_NOTEBOOKS:
        target = root / name / f"{nb}.html"
        links.append(f"[{nb}]({Path(os.path.relpath(target, base)).as_posix()})")
    return " \u00b7 ".join(links)


# =========================================================================== run_all

class RunAllError(RuntimeError):
    """A build problem found before or between notebooks (bad experiment file, lock held)."""


class LockBusy(RunAllError):
    pass


def _log(message: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[run_all {stamp}] {message}", flush=True)


# --------------------------------------------------------------------------- experiments

def experiment_dirs() -> list[Path]:
    """Folders holding experiment YAML files: $BLOODCELL_EXPERIMENTS (os.pathsep-separated)
    or experiments/."""
    env = os.environ.get("BLOODCELL_EXPERIMENTS")
    if env:
        return [Path(p).expanduser().absolute() for p in env.split(os.pathsep) if p]
    return [EXPERIMENTS_DIR]


def discover_experiments(dirs: Sequence[Path] | None = None) -> dict[str, dict[str, Any]]:
    """name -> {"path", "params"} for every ``*.yaml``/``*.yml``; the name is the file stem.

    Keys must be TrainConfig fields (checked here, before any notebook runs); values are
    checked by the notebooks' first cells (config.make_config)."""
    import yaml

    from .config import FIELD_NAMES

    found: dict[str, dict[str, Any]] = {}
    for folder in dirs if dirs is not None else experiment_dirs():
        if not folder.is_dir():
            raise RunAllError(f"experiments folder {folder} does not exist")
        for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
            name = path.stem
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
                raise RunAllError(f"{path}: experiment file names may hold letters, digits, '-', '_' and '.' only")
            if name in found:
                raise RunAllError(f"experiment '{name}' is defined twice: {found[name]['path']} and {path}")
            try:
                params = yaml.safe_load(path.read_text()) or {}
            except yaml.YAMLError as err:
                raise RunAllError(f"{path} is not valid YAML: {err}") from err
            if not isinstance(params, dict):
                raise RunAllError(f"{path} must hold a mapping of parameter: value")
            unknown = sorted(set(params) - set(FIELD_NAMES))
            if unknown:
                raise RunAllError(f"{path}: unknown parameter(s) {', '.join(unknown)}; "
                                  f"accepted: {', '.join(FIELD_NAMES)}")
            if params.get("name", name) != name:
                raise RunAllError(f"{path}: 'name' = {params['name']!r} must equal the file name '{name}' (or be left out)")
            if "profile" in params:
                raise RunAllError(f"{path}: 'profile' is chosen by run_all.sh --profile, not by the experiment file")
            found[name] = {"path": path, "params": {**params, "name": name}}
    if not found:
        raise RunAllError("no experiment files (*.yaml) in " + ", ".join(str(d) for d in (dirs or experiment_dirs())))
    return found


# --------------------------------------------------------------------------- lock

class BuildLock:
    """An exclusive flock on ``<reports>/.lock``. The lock file is hard-linked into every new
    reports folder before the swap, so the path keeps naming the same locked inode."""

    def __init__(self, live: Path):
        self.live = live
        self.path = live / LOCK_FILE
        self.fd: int | None = None

    def holder(self) -> str:
        try:
            text = self.path.read_text().strip()
            info = json.loads(text) if text else {}
        except (OSError, ValueError):
            return "another run_all.sh (holder unknown)"
        return (f"run_all.sh with PID {info.get('pid')} (started {info.get('started')}, "
                f"command: {info.get('command')})")

    def acquire(self, wait: bool) -> None:
        import fcntl

        self.live.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.holder()
            if not wait:
                os.close(self.fd)
                self.fd = None
                raise LockBusy(f"another build of {self.live} is running: {holder}. Not starting a second one "
                               f"(lock {self.path}). Wait for it to finish, or pass --wait to queue behind it.")
            _log(f"waiting: {holder} holds {self.path}")
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            _log("lock acquired")
        info = {"pid": os.getpid(), "started": _dt.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join(["run_all.sh", *sys.argv[2:]]) if sys.argv[1:2] == ["run-all"] else " ".join(sys.argv)}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(info) + "\n").encode(), 0)

    def release(self) -> None:
        import fcntl

        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


# --------------------------------------------------------------------------- atomic swap

_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries (Linux renameat2 RENAME_EXCHANGE); False when
    the system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def swap_in(staging: Path, live: Path) -> None:
    """Make ``staging`` the new ``live`` folder: one atomic exchange where supported (readers
    see the old tree or the new one, never a mix), else two renames; the old tree is deleted."""
    if not live.exists():
        os.rename(staging, live)
        return
    if _exchange(staging, live):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the previous reports
        return
    old = live.parent / f".{live.name}.old-{os.getpid()}"
    os.rename(live, old)
    os.rename(staging, live)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- kernels

class Kernels:
    """The ``bloodcell`` kernels that execute the notebooks.

    ``fresh``: a new kernel per notebook (each notebook starts from nothing, as in JupyterLab).
    ``shared``: one kernel for the whole build, its namespace reset (``%reset -f``, figures
    closed) between notebooks -- saves the 5-8 s of interpreter start and torch import per
    notebook that dominate a smoke build. Kernel stderr goes to ``log_path``.
    """

    def __init__(self, mode: str, log_path: Path):
        self.mode = mode
        self.log_path = log_path
        self.shared = None

    def _start(self, cwd: Path):
        from jupyter_client.manager import KernelManager

        km = KernelManager(kernel_name=KERNEL_NAME)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            km.start_kernel(cwd=str(cwd), stdout=log, stderr=log)
        finally:
            log.close()
        return km

    def get(self, cwd: Path):
        if self.mode == "fresh":
            return self._start(cwd)
        if self.shared is None or not self.shared.is_alive():
            self.shared = self._start(cwd)
        self._reset(self.shared, cwd)
        return self.shared

    def _reset(self, km, cwd: Path) -> None:
        code = ("get_ipython().run_line_magic('reset', '-f')\n"
                "import os as _os, matplotlib.pyplot as _plt\n"
                "_plt.close('all')\n"
                f"_os.chdir({str(cwd)!r})\n"
                "del _os, _plt\n")
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=120)
            reply = kc.execute_interactive(code, timeout=120, store_history=False, output_hook=lambda msg: None)
            if reply["content"].get("status") != "ok":
                raise RunAllError(f"could not reset the shared kernel: {reply['content'].get('evalue')}")
        finally:
            kc.stop_channels()

    def done(self, km) -> None:
        if self.mode == "fresh":
            _shutdown(km)

    def close(self) -> None:
        if self.shared is not None:
            _shutdown(self.shared)
            self.shared = None


def _shutdown(km) -> None:
    try:
        if km.is_alive():
            km.shutdown_kernel(now=False)
    except Exception:  # noqa: BLE001 - a kernel that is already gone is fine
        try:
            km.shutdown_kernel(now=True)
        except Exception:  # noqa: BLE001
            pass


# --------------------------------------------------------------------------- notebooks -> HTML

_HTML_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{#- Reports must open offline: no require.js, MathJax or mermaid from a CDN (the notebooks
    use none of them), which also keeps the browser console free of load errors. -#}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block extra_css -%}
{{ super() }}
<style>
figure.bloodcell-figure figcaption{font-size:.9em;color:#57606a;margin-top:.2em}
table.bloodcell-table{border-collapse:collapse} table.bloodcell-table th,table.bloodcell-table td{padding:2px 8px}
</style>
{%- endblock extra_css -%}
"""

_EXPORTER = None


def html_exporter():
    """nbconvert's lab HTML exporter, code cells hidden (``--no-input``), offline template."""
    global _EXPORTER
    if _EXPORTER is None:
        from jinja2 import DictLoader
        from nbconvert import HTMLExporter
        from traitlets.config import Config

        # Coalescing streams applies carriage returns as a terminal would, so a tqdm bar
        # reads as its last state instead of one line per update.
        config = Config({"CoalesceStreamsPreprocessor": {"enabled": True}})
        _EXPORTER = HTMLExporter(config=config, template_name="lab",
                                 extra_loaders=[DictLoader({"bloodcell.html.j2": _HTML_TEMPLATE})],
                                 template_file="bloodcell.html.j2")
        _EXPORTER.exclude_input = True
        _EXPORTER.exclude_input_prompt = True
        _EXPORTER.exclude_output_prompt = True
    return _EXPORTER


def notebook_to_html(ipynb: Path, html_path: Path | None = None, title: str | None = None) -> Path:
    import nbformat

    html_path = html_path or ipynb.with_suffix(".html")
    nb = nbformat.read(ipynb, as_version=4)
    body, _ = html_exporter().from_notebook_node(nb, resources={"metadata": {"name": title or ipynb.stem}})
    atomic_write_text(html_path, body)
    return html_path


def _renumber(ipynb: Path) -> None:
    """Execution counts 1..n (a shared kernel keeps counting across notebooks)."""
    import nbformat

    nb = nbformat.read(ipynb, as_version=4)
    count = 0
    for cell in nb.cells:
        if cell.cell_type != "code" or cell.get("execution_count") is None:
            continue
        count += 1
        cell.execution_count = count
        for out in cell.get("outputs", []):
            if out.get("output_type") == "execute_result":
                out["execution_count"] = count
    nbformat.write(nb, str(ipynb))


class NotebookFailed(RunAllError):
    def __init__(self, experiment: str, notebook: str, error: str, executed: Path):
        self.experiment, self.notebook, self.error, self.executed = experiment, notebook, error, executed
        super().__init__(f"experiment '{experiment}', notebook {notebook}: {error}")


def _short_error(err: BaseException, executed: Path | None = None) -> str:
    ename = getattr(err, "ename", None)
    if ename:
        evalue = str(getattr(err, "evalue", "")).strip()
        where = ""
        cell = _error_cell(executed) if executed is not None else None
        if cell is not None:
            where = f" (cell In [{cell}])"
        return f"{ename}: {evalue}{where}"
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _error_cell(executed: Path) -> int | None:
    """Execution count (as renumbered in the executed notebook) of the cell that raised."""
    import nbformat

    try:
        nb = nbformat.read(executed, as_version=4)
    except Exception:  # noqa: BLE001
        return None
    for cell in nb.cells:
        if cell.cell_type == "code" and any(o.get("output_type") == "error" for o in cell.get("outputs", [])):
            return cell.get("execution_count")
    return None


def execute_notebook(kernels: Kernels, source: Path, output: Path, params: Mapping[str, Any], *,
                     experiment: str, cwd: Path, verbose: bool = False, cell_timeout: int | None = None) -> float:
    """Run one notebook with papermill into ``output`` (then HTML beside it); returns seconds.
    Raises NotebookFailed (the executed notebook, error cell included, is still written)."""
    import papermill as pm

    started = time.time()
    output.parent.mkdir(parents=True, exist_ok=True)
    km = None
    error: BaseException | None = None
    try:
        km = kernels.get(cwd)
        pm.execute_notebook(str(source), str(output), parameters=dict(params), kernel_name=KERNEL_NAME, km=km,
                            progress_bar=False, log_output=verbose, cwd=None,
                            execution_timeout=cell_timeout, start_timeout=120)
    except KeyboardInterrupt:
        raise
    except Exception as err:  # noqa: BLE001 - reported with experiment and notebook below
        error = err
    finally:
        if km is not None:
            kernels.done(km)
    if output.is_file():
        try:
            _renumber(output)
            notebook_to_html(output, title=f"{experiment} \u00b7 {source.stem}")
        except Exception as err:  # noqa: BLE001
            if error is None:
                error = err
    elif error is None:
        error = RunAllError(f"papermill wrote no output notebook {output}")
    if error is not None:
        raise NotebookFailed(experiment, source.name, _short_error(error, output), output) from error
    return time.time() - started


# --------------------------------------------------------------------------- the build

def _parse_run_all(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="run_all.sh",
        description="Execute every experiment's notebooks (01_explore, 02_train, 03_evaluate) with papermill and "
                    "the 'bloodcell' kernel, then 04_report once; write executed notebooks, HTML (code hidden), "
                    "metrics.json and index.html into the reports folder, replacing it atomically.",
        epilog="Environment: BLOODCELL_REPORTS (reports folder, default reports/), BLOODCELL_RUNS (run folders, "
               "default runs/), BLOODCELL_CACHE (image cache), BLOODCELL_DATA (data root), BLOODCELL_EXPERIMENTS "
               "(experiment folders separated by ':', default experiments/).")
    parser.add_argument("--profile", choices=("full", "smoke"), default="full",
                        help="full: the real study (default); smoke: tiny subsets, 1 epoch, low resolution")
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only this experiment (repeatable or comma-separated); other experiments' reports "
                             "and records are kept")
    parser.add_argument("--wait", action="store_true", help="wait for a running build instead of refusing")
    parser.add_argument("--keep-going", action="store_true",
                        help="after a failing notebook, still run the other experiments (the build still fails)")
    parser.add_argument("--kernel", choices=("auto", "fresh", "shared"), default="auto",
                        help="fresh: a new kernel per notebook; shared: one kernel, namespace reset between "
                             "notebooks; auto (default): shared for smoke, fresh for full")
    parser.add_argument("--cell-timeout", type=int, default=None, metavar="S", help="fail a cell running longer")
    parser.add_argument("--verbose", action="store_true", help="also print every cell's output")
    parser.add_argument("--list", action="store_true", help="print the experiments and notebooks, run nothing")
    args = parser.parse_args(list(argv))
    args.only = [n.strip() for item in args.only for n in item.split(",") if n.strip()]
    if args.kernel == "auto":
        args.kernel = "shared" if args.profile == "smoke" else "fresh"
    return args


def smoke_output_dir(output_dir: str | None) -> Path:
    """Where smoke runs go: ``<runs>/smoke`` (``<output_dir>/smoke`` when the experiment sets one)."""
    if output_dir:
        base = Path(output_dir).expanduser()
        base = base if base.is_absolute() else PROJECT_ROOT / base
    else:
        base = Path(os.environ.get("BLOODCELL_RUNS", PROJECT_ROOT / "runs")).expanduser().absolute()
    return base / "smoke"


class _Terminated(BaseException):
    pass


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise _Terminated()


def run_all(argv: Sequence[str] | None = None) -> int:
    args = _parse_run_all(sys.argv[2:] if argv is None else argv)
    live = reports_dir()
    try:
        experiments = discover_experiments()
    except RunAllError as err:
        print(f"run_all.sh: {err}", file=sys.stderr)
        return 2
    unknown = [n for n in args.only if n not in experiments]
    if unknown:
        print(f"run_all.sh: --only {', '.join(unknown)}: no such experiment; known: {', '.join(experiments)}",
              file=sys.stderr)
        return 2
    selected = [n for n in experiments if not args.only or n in args.only]
    if args.verbose:  # papermill logs each cell's output through logging
        import logging

        logging.basicConfig(level=logging.INFO, format="    %(message)s")
    if args.list:
        for name in selected:
            print(f"{name}: {experiments[name]['path']} -> {live / name}/"
                  f"{{{','.join(EXPERIMENT_NOTEBOOKS)}}}.{{ipynb,html}}")
        print(f"{REPORT_NOTEBOOK}: -> {live / (REPORT_NOTEBOOK + '.html')}; index: {live / INDEX_FILE}")
        return 0

    lock = BuildLock(live)
    try:
        lock.acquire(wait=args.wait)
    except LockBusy as err:
        print(f"run_all.sh: {err}", file=sys.stderr)
        return 75  # EX_TEMPFAIL
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _build(args, live, lock, experiments, selected)
    except (KeyboardInterrupt, _Terminated):
        _log(f"interrupted; {live} left as it was")
        return 130
    except Exception as err:  # noqa: BLE001 - a build error outside any notebook
        print(f"run_all.sh: build failed: {type(err).__name__}: {err}; {live} left as it was", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(_staging_path(live), ignore_errors=True)  # gone already unless the build broke off
        signal.signal(signal.SIGTERM, previous)
        lock.release()


def _staging_path(live: Path) -> Path:
    return live.parent / f".{live.name}.staging-{os.getpid()}"


def _build(args, live: Path, lock: BuildLock, experiments: dict, selected: list[str]) -> int:
    from .provenance import git_commit

    started = time.time()
    for stale in live.parent.glob(f".{live.name}.staging-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed build (we hold the lock)
    for stale in live.parent.glob(f".{live.name}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = _staging_path(live)
    failed_dir = live.parent / f"{live.name}.failed"
    staging.mkdir(parents=True)
    # Keep the other experiments' reports when only some are rebuilt.
    kept = [n for n in experiments if n not in selected and (live / n / RECORD_FILE).is_file()]
    for name in kept:
        shutil.copytree(live / name, staging / name, symlinks=True)
    os.environ["BLOODCELL_REPORTS"] = str(staging)  # the kernels write here
    kernels = Kernels(args.kernel, staging / "_logs" / "kernels.log")
    failures: list[NotebookFailed] = []
    timings: dict[str, dict[str, float]] = {}
    _log(f"building {live} (profile {args.profile}, kernel {args.kernel}): {len(selected)} experiment(s) "
         f"{', '.join(selected)}" + (f"; keeping {', '.join(kept)}" if kept else ""))
    try:
        for i, name in enumerate(selected, 1):
            params = {**experiments[name]["params"], "profile": args.profile}
            if args.profile == "smoke":
                # Smoke runs must never overwrite the full study's checkpoints.
                params["output_dir"] = str(smoke_output_dir(params.get("output_dir")))
            out = staging / name
            (out / FIGURES_DIR).mkdir(parents=True, exist_ok=True)
            timings[name] = {}
            try:
                for nb in EXPERIMENT_NOTEBOOKS:
                    _log(f"({i}/{len(selected)}) {name}: {nb} ...")
                    seconds = execute_notebook(kernels, NOTEBOOKS_DIR / f"{nb}.ipynb", out / f"{nb}.ipynb", params,
                                               experiment=name, cwd=out, verbose=args.verbose,
                                               cell_timeout=args.cell_timeout)
                    timings[name][nb] = round(seconds, 2)
                    _log(f"({i}/{len(selected)}) {name}: {nb} done in {seconds:.1f} s")
                _finish_record(out, name, timings[name], args)
            except NotebookFailed as err:
                failures.append(err)
                short = err.error if len(err.error) <= 300 else err.error[:300] + " ..."
                _log(f"({i}/{len(selected)}) {name}: FAILED in {err.notebook}: {short}")
                if not args.keep_going:
                    break
        if not failures:
            names = [n for n in experiments if (staging / n / RECORD_FILE).is_file()]
            records = load_records(staging, names)
            info = {"profile": args.profile, "git": git_commit(), "experiments_run": selected, "kept": kept,
                    "kernel": args.kernel}
            atomic_write_json(staging / METRICS_FILE, metrics_document(records, **info))
            try:
                _log(f"{REPORT_NOTEBOOK} ...")
                seconds = execute_notebook(kernels, NOTEBOOKS_DIR / f"{REPORT_NOTEBOOK}.ipynb",
                                           staging / f"{REPORT_NOTEBOOK}.ipynb",
                                           {"profile": args.profile, "experiments": names},
                                           experiment="(all)", cwd=staging, verbose=args.verbose,
                                           cell_timeout=args.cell_timeout)
                _log(f"{REPORT_NOTEBOOK} done in {seconds:.1f} s")
            except NotebookFailed as err:
                failures.append(err)
    finally:
        kernels.close()

    if failures:
        shutil.rmtree(failed_dir, ignore_errors=True)
        os.rename(staging, failed_dir)
        for err in failures:
            executed = failed_dir / err.executed.relative_to(staging)
            print(f"run_all.sh: FAILED: experiment '{err.experiment}', notebook {err.notebook}\n"
                  f"  error: {err.error}\n"
                  f"  executed notebook: {executed}\n"
                  f"  as HTML: {executed.with_suffix('.html')}", file=sys.stderr)
        print(f"run_all.sh: {live} was left unchanged (the last good build, if any, is still there).",
              file=sys.stderr)
        return 1

    total = time.time() - started
    write_index(staging, records, info={**info, "generated": _dt.datetime.now().isoformat(timespec="seconds"),
                                         "seconds": round(total, 1)})
    readme = live / "README.md"
    if not readme.is_file():
        readme = PROJECT_ROOT / "reports" / "README.md"
    if readme.is_file():
        shutil.copy2(readme, staging / "README.md")
    _make_readable(staging)
    os.link(lock.path, staging / LOCK_FILE)  # same inode: the lock survives the swap
    swap_in(staging, live)
    shutil.rmtree(failed_dir, ignore_errors=True)
    _log(f"done in {total:.1f} s: {live / INDEX_FILE}")
    for name in selected:
        t = timings.get(name, {})
        _log(f"  {name}: " + ", ".join(f"{nb} {s:.1f} s" for nb, s in t.items()))
    return 0


def _make_readable(root: Path) -> None:
    """Atomic writes create 0600 files; reports are meant to be read (and served) by others."""
    for folder, dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            mode = os.stat(path).st_mode & 0o777
            if mode & 0o044 != 0o044:
                os.chmod(path, mode | 0o044)


def _finish_record(out: Path, name: str, timings: Mapping[str, float], args) -> None:
    path = out / RECORD_FILE
    if not path.is_file():
        raise NotebookFailed(name, "03_evaluate.ipynb", f"the notebook wrote no {RECORD_FILE}", out / "03_evaluate.ipynb")
    record = json.loads(path.read_text())
    record["total_seconds"] = round(sum(timings.values()), 2)
    record["notebook_seconds"] = dict(timings)
    record["reports"] = {nb: f"{name}/{nb}.html" for nb in EXPERIMENT_NOTEBOOKS}
    record.setdefault("provenance", {})["build"] = {"kernel": args.kernel, "profile": args.profile,
                                                    "command": "run_all.sh " + " ".join(sys.argv[2:])}
    atomic_write_json(path, record)


# =========================================================================== screenshot

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def launch_chromium(playwright):
    """Headless Chromium from the system package (never ``playwright install``)."""
    path = os.environ.get("BLOODCELL_CHROMIUM", CHROMIUM)
    return playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)


def screenshot(page_path: str | os.PathLike, png_path: str | os.PathLike, *, width: int = 1280,
               height: int = 900, full_page: bool = True) -> Path:
    """Render a local HTML page (e.g. reports/index.html) to PNG with headless Chromium."""
    from playwright.sync_api import sync_playwright

    page_path, png_path = Path(page_path).absolute(), Path(png_path)
    if not page_path.is_file():
        raise FileNotFoundError(f"{page_path} does not exist; build the reports first (./run_all.sh)")
    png_path.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(page_path.as_uri(), wait_until="load")
            data = page.screenshot(full_page=full_page, type="png")
        finally:
            browser.close()
    from .fileio import atomic_write_bytes

    return atomic_write_bytes(png_path, data)


# =========================================================================== command line

def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run-all":
        return run_all(argv[1:])
    if argv and argv[0] == "screenshot":
        parser = argparse.ArgumentParser(prog="python -m bloodcell_lib.reporting screenshot",
                                         description="Render a local HTML page to PNG with headless Chromium.")
        parser.add_argument("page", nargs="?", default=str(reports_dir() / INDEX_FILE))
        parser.add_argument("out", nargs="?", default=str(PROJECT_ROOT / "docs" / "report-screenshot.png"))
        parser.add_argument("--width", type=int, default=1280)
        parser.add_argument("--height", type=int, default=900)
        parser.add_argument("--full-page", action="store_true", help="the whole page, not just the first screen")
        opts = parser.parse_args(argv[1:])
        print(screenshot(opts.page, opts.out, width=opts.width, height=opts.height, full_page=opts.full_page))
        return 0
    if argv and argv[0] == "index":
        root = Path(argv[1]) if len(argv) > 1 else reports_dir()
        records = load_records(root)
        atomic_write_json(root / METRICS_FILE, metrics_document(records))
        print(write_index(root, records))
        return 0
    print("usage: python -m bloodcell_lib.reporting run-all [run_all.sh options]\n"
          "       python -m bloodcell_lib.reporting screenshot [PAGE.html [OUT.png]] [--full-page]\n"
          "       python -m bloodcell_lib.reporting index [REPORTS_DIR]   (rebuild metrics.json + index.html)")
    return 0 if argv[:1] in (["-h"], ["--help"]) else 2


if __name__ == "__main__":
    sys.exit(main())
