"""What the notebooks show: the helpers they call to display figures, tables, Markdown and
warnings, and the tables and figures built for them.

``notebook_config`` turns a notebook's parameters cell into a validated TrainConfig;
``show_figure`` shows a matplotlib figure as an HTML ``<figure>`` with alt text and caption
(optionally saved as PNG for the index page), ``show_table``, ``show_markdown`` and
``show_warning`` the rest. They keep the notebooks thin. The notebooks import this module
first (see the warnings filter below). What a report *says* -- records, metrics.json, the
comparison, targets and ablation tables -- lives in ``reporting``.
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from bloodcell_lib.modeling.rundir import RunDir
from bloodcell_lib.reporting.formatting import format_score
from bloodcell_lib.reporting.records import (EXPERIMENT_NOTEBOOKS, as_number, headline_scores, init_message,
                                             reports_dir, run_dirs, run_infos)
from bloodcell_lib.reporting.study import REFERENCES

# huggingface_hub (imported by timm) imports tqdm.auto, which inside Jupyter warns that
# ipywidgets is missing and falls back to plain tqdm -- the project's choice anyway. The
# notebooks import this module first so that warning does not clutter the reports.
warnings.filterwarnings("ignore", message="IProgress not found")

NOTEBOOK_TITLES = {
    "01_explore": "Data exploration and audit",
    "02_train": "Training",
    "03_evaluate": "Evaluation on the held-out set",
    "04_report": "All experiments side by side",
}


# =========================================================================== parameters

def notebook_parameters(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """Every TrainConfig field found in a notebook's globals (the parameters cell plus what
    papermill injected), as given: before the profile is applied."""
    from bloodcell_lib.training.config import FIELD_NAMES

    return {key: namespace[key] for key in FIELD_NAMES if key in namespace}


def notebook_config(namespace: Mapping[str, Any]):
    """TrainConfig from a notebook's globals (``notebook_parameters``); the profile is applied
    and the whole config validated (ConfigError names the bad parameter)."""
    from bloodcell_lib.training.config import make_config

    return make_config(notebook_parameters(namespace))


# =========================================================================== showing things

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
        from bloodcell_lib.core.fileio import atomic_write_bytes

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

# =========================================================================== tables and text

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

    from bloodcell_lib.training.config import TrainConfig

    defaults = TrainConfig().to_dict()
    rows = [{"parameter": k, "value": repr(v) if isinstance(v, str) else str(v),
             "default": "" if v != defaults.get(k) else "yes"} for k, v in cfg.to_dict().items()]
    return pd.DataFrame(rows)


def counts_table(table, own_source: str | None = None):
    """Images per class (rows) and split (columns), with totals; rows of a data set other than
    ``own_source`` (config extra_train) get columns of their own, e.g. ``train (pbc)``."""
    import pandas as pd

    split = table["split"].fillna("").astype(str).replace("", "all")
    if own_source is not None:
        other = table["source"].astype(str) != own_source
        split = split.where(~other, split + " (" + table["source"].astype(str) + ")")
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
            row["mean over folds"] = format_score(stats.get("mean"), stats.get("sd"))
            row["pooled out-of-fold"] = format_score(as_number(metrics.get(key)))
        else:
            row["value"] = format_score(as_number(metrics.get(key)))
        rows.append(row)
    rows.append({"metric": "images scored", **({"mean over folds": "", "pooled out-of-fold": str(metrics.get("n"))}
                                             if cv else {"value": str(metrics.get("n"))})})
    return pd.DataFrame(rows)


def tta_markdown(tta_used: bool, no_tta: Mapping[str, Any], tta: Mapping[str, Any]) -> str:
    """Held-out accuracy and macro-F1 of one checkpoint without and with test-time
    augmentation, and which of the two the headline numbers are."""
    off, on = (headline_scores(m, keys=("accuracy", "macro_f1")) for m in (no_tta, tta))
    return ("Test-time augmentation (8 dihedral views), same checkpoint(s): accuracy "
            f"{format_score(off['accuracy'], off['accuracy_sd'])} without, "
            f"{format_score(on['accuracy'], on['accuracy_sd'])} with; "
            f"macro-F1 {format_score(off['macro_f1'], off['macro_f1_sd'])} without, "
            f"{format_score(on['macro_f1'], on['macro_f1_sd'])} with. The numbers above are "
            f"**{'with' if tta_used else 'without'}** it (config `tta: {'true' if tta_used else 'false'}`).")


def per_class_table(metrics: Mapping[str, Any]):
    import pandas as pd

    rows = [{"class": name, "precision": v.get("precision"), "recall": v.get("recall"), "F1": v.get("f1"),
             "ROC-AUC": v.get("roc_auc"), "support": v.get("support")}
            for name, v in (metrics.get("per_class") or {}).items()]
    return pd.DataFrame(rows, columns=["class", "precision", "recall", "F1", "ROC-AUC", "support"])


def frame(rows: Sequence[Mapping[str, Any]]):
    import pandas as pd

    return pd.DataFrame(list(rows))


def run_files_markdown(cfg) -> str:
    """Where training left its files (what 03_evaluate and --resume read)."""
    lines = [f"Run directory `{cfg.run_dir}`:"]
    for folder in run_dirs(cfg.run_dir):
        files = RunDir(folder).training_files_present()
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
    from bloodcell_lib.data import splits

    if cfg.cv_folds:
        return splits.splits_for(cfg, manifest, RunDir(cfg.run_dir).fold(0).split, write=False, fold=0)
    return splits.splits_for(cfg, manifest, RunDir(cfg.run_dir).split, write=False)


def kept_by(monitor: str) -> str:
    """What chose the kept checkpoint, in words."""
    return "the last epoch" if monitor == "none" else f"best {monitor}"


def training_summary(results: Sequence[Any]):
    """One row per trained model (fold): epochs, the kept checkpoint's epoch and what chose it,
    time, init, checkpoint."""
    import pandas as pd

    rows = []
    for r in results:
        rows.append({"fold": "" if r.fold is None else r.fold + 1, "epochs run": r.epochs_run,
                     "kept epoch": r.best_epoch, "kept by": kept_by(r.monitor),
                     "value": "" if r.monitor == "none" else as_number(r.best_metric),
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
        return RunDir(cfg.run_dir).fold(first).checkpoint_best, preds[preds["fold"] == first]
    return RunDir(cfg.run_dir).checkpoint_best, preds


def history_for(record: Mapping[str, Any]):
    """history.csv of an experiment's run (fold 1 for cross-validation), or None."""
    import pandas as pd

    run_dir = (record.get("provenance") or {}).get("run_dir")
    if not run_dir:
        return None
    path = RunDir(run_dirs(run_dir)[0]).history
    return pd.read_csv(path) if path.is_file() else None


# =========================================================================== figures of the report notebook

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

