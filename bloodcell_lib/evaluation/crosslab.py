"""Score a run's kept checkpoint on the other labs' images: how far a model travels.

Four independent labs took the pictures this project uses: PBC (Barcelona), the BCCD lab
(the BCCD smears and Kaggle's dataset2, which augments them), LISC (Tehran) and KRD-WBC
(Erbil; Taha, Alizadeh & Mohammad, Mendeley Data v2 (2023), doi:10.17632/jzdj6h7gms.2,
CC BY 4.0). A model
trained in one lab is scored here on every *target source* of a lab it never saw, neither
in training, in ``extra_train`` nor through ``init_from`` weights (``trained_labs``). A
source of a lab the run trained on is skipped with the reason, never scored as cross-lab.

Only the classes both share count: the model's probabilities are restricted to the model
classes present in the target set (names compared ignoring case) and renormalised, so an
8-class PBC model scored on LISC's 5 classes argmaxes over those 5 columns. A class the target
set has fewer than ``MIN_CLASS_CELLS`` (10) cells of is left out too (KRD-WBC's one basophil:
its recall, 0 or 1, would move a 5-class balanced accuracy by 0.2); each record names such
classes and their counts (``classes_left_out``, ``min_class_cells``). Images go
through the one inference path (``predict.predict_views`` on the decoded-image cache, as
``evaluate`` does) with the checkpoint's own size and crop: a ``crop: cell`` or ``crop:
stain`` model sees the stain crop on sources without boxes; BCCD rows are always its
annotated WBC boxes (the cell the label names).

Kaggle TEST holds about 35 augmented copies of each of its ~71 cells, so it is scored per
cell: the copies of one group (``copies.copy_groups``, the manifest's ``group``) average
their probabilities into one prediction, and the interval is a bootstrap over cells.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from bloodcell_lib.core.paths import PROJECT_ROOT
from bloodcell_lib.data.sources import LABS, MIN_CLASS_CELLS, too_few_cells
from bloodcell_lib.modeling.rundir import KEPT_CHECKPOINT, fold_dirs

# Each data set's lab (data.sources.LABS), named by the lab's first set: kaggle -> bccd.
LAB_OF = {name: next(first for first in LABS if LABS[first] == lab) for name, lab in LABS.items()}
LISC_FOLDER = Path("lisc") / "LISC_crops"
KRD_FOLDER = Path("krd") / "KRD_WBC"
BOOTSTRAP_RESAMPLES = 2000
BCCD_MARGIN = 0.15  # the bccd experiment's crop margin, used when the model itself has none
RECORD_KEYS = ("experiment", "train_labs", "test_source", "unit", "n", "n_images", "accuracy",
               "balanced_accuracy", "macro_f1", "per_class_recall", "interval", "folds", "seconds",
               "min_class_cells", "classes_left_out")
MATRIX_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


@dataclass(frozen=True)
class TargetSource:
    """One set of another lab's images: ``rows(crop, margin)`` gives its table (path, label,
    group, box) under the model's crop; ``per_cell``: its rows are copies of fewer cells;
    ``min_class_cells``: a class with fewer rows is left out of the score (and named)."""

    name: str
    lab: str
    description: str
    rows: Callable[[str, float], pd.DataFrame]
    per_cell: bool = False
    min_class_cells: int = MIN_CLASS_CELLS


def _data_root() -> Path:
    from bloodcell_lib.core.paths import data_root_candidates

    roots = [root for _, root in data_root_candidates()
             if any((root / folder).is_dir() for folder in (LISC_FOLDER, KRD_FOLDER, Path("pbc")))]
    if not roots:
        raise FileNotFoundError("no data root with lisc/, krd/ or pbc/ found (set $BLOODCELL_DATA)")
    return roots[0]


def _with_stain(table: pd.DataFrame, crop: str, margin: float) -> pd.DataFrame:
    """Boxless pictures cropped around their stained nucleus when the model was trained on crops
    (``crop: window``: ``margin`` is the window's side in pixels, see ``crop_size``)."""
    from bloodcell_lib.data.stain import cell_boxes, window_boxes

    table = table.reset_index(drop=True)
    if crop == "window":
        table["box"] = pd.Series(window_boxes(table["path"].tolist(), int(margin)), index=table.index, dtype=object)
    elif crop in ("cell", "stain", "nucleus"):
        boxes = cell_boxes(table["path"].tolist(), margin, join_lobes=crop == "nucleus")
        table["box"] = pd.Series(boxes, index=table.index, dtype=object)
    return table


def crop_size(config: dict[str, Any]) -> float:
    """What sizes a run's crop: the window's side for ``crop: window``, else the margin."""
    if config.get("crop") == "window":
        return float(config.get("crop_window", 200))
    return float(config.get("crop_margin", BCCD_MARGIN))


def _pbc_rows(crop: str, margin: float) -> pd.DataFrame:
    """PBC's test part as the pbc experiment splits it (70/10/20, seed 0)."""
    from bloodcell_lib.data.datasets import load_manifest
    from bloodcell_lib.data.splits import make_splits

    table = make_splits(load_manifest("pbc").table, val_fraction=0.1, test_fraction=0.2, seed=0)
    return _with_stain(table[table["split"] == "test"], crop, margin)


def _bccd_rows(crop: str, margin: float) -> pd.DataFrame:
    """BCCD's annotated WBC boxes, or for a stain/nucleus-crop model the crop it makes itself on each
    field (as ``predict`` would): a model is scored with its own preprocessing."""
    from bloodcell_lib.data.catalog import STAIN_CROPS
    from bloodcell_lib.data.datasets import load_manifest

    if crop in STAIN_CROPS:
        return load_manifest("bccd", crop=crop, margin=margin).table
    return load_manifest("bccd", crop="cell", margin=margin if crop == "cell" else BCCD_MARGIN).table


def _kaggle_test_rows(crop: str, margin: float) -> pd.DataFrame:
    from bloodcell_lib.data.datasets import load_manifest

    table = load_manifest("kaggle").table
    return _with_stain(table[table["split"] == "test"], crop, margin)


def _whole_set_rows(name: str) -> Callable[[str, float], pd.DataFrame]:
    """Every picture of named set ``name`` (a lab that is one folder per class: lisc, krd)."""
    def rows(crop: str, margin: float) -> pd.DataFrame:
        from bloodcell_lib.data.datasets import load_manifest

        return _with_stain(load_manifest(name).table, crop, margin)

    return rows


TARGET_SOURCES = (
    TargetSource("pbc", "pbc", "PBC test part (70/10/20, seed 0)", _pbc_rows),
    TargetSource("bccd", "bccd", "BCCD: every annotated WBC box", _bccd_rows),
    # Scored per cell (4-48 cells a class, ~600 pictures each) with a bootstrap interval: no class left out.
    TargetSource("kaggle-test", "bccd", "Kaggle dataset2 official TEST, per cell", _kaggle_test_rows, per_cell=True,
                 min_class_cells=0),
    TargetSource("lisc", "lisc", "LISC crops", _whole_set_rows("lisc")),
    TargetSource("krd", "krd", "KRD-WBC fields (Taha, Alizadeh & Mohammad 2023, doi:10.17632/jzdj6h7gms.2, "
                 "CC BY 4.0)", _whole_set_rows("krd")),
)


# --------------------------------------------------------------------------- which labs a run saw
def _experiment_config(name: str) -> dict[str, Any] | None:
    import yaml

    path = PROJECT_ROOT / "experiments" / f"{name}.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def trained_labs(config: dict[str, Any], _seen: tuple[str, ...] = ()) -> set[str]:
    """Labs whose pictures shaped the model of run ``config``: its data set (or ``sources``
    less ``test_source``), ``extra_train`` and, through the experiment named by ``init_from``,
    the labs its starting weights saw. ValueError when a lab cannot be told (a ``folder`` or
    ``csv`` set outside the known labs, an unknown ``init_from``): then nothing is cross-lab."""
    names = list(config.get("sources") or [config.get("dataset")])
    names = [n for n in names if n != config.get("test_source")] + [config.get("extra_train")]
    labs = {_lab_of_set(name, config) for name in names if name}
    parent = config.get("init_from")
    if parent:
        parent_config = _experiment_config(parent) if not str(parent).endswith(".pt") else None
        if parent_config is None or parent in _seen:
            raise ValueError(f"init_from = {parent!r}: cannot tell which labs its weights were trained on")
        labs |= trained_labs(parent_config, (*_seen, parent))
    return labs


def labs_in_run(config: dict[str, Any]) -> set[str]:
    """Labs whose pictures are in run ``config``'s split: ``trained_labs`` and, for a
    leave-one-lab-out run, the held-out lab (its test split). ValueError as ``trained_labs``."""
    held_out = config.get("test_source")
    return trained_labs(config) | ({LAB_OF[held_out]} if held_out else set())


def _lab_of_set(name: str, config: dict[str, Any]) -> str:
    if name in LAB_OF:
        return LAB_OF[name]
    data_dir = config.get("data_dir")
    for lab in ("lisc", "krd"):  # a folder set pointed at one of these labs' data
        if name == "folder" and data_dir and Path(data_dir).resolve().is_relative_to((_data_root() / lab).resolve()):
            return lab
    raise ValueError(f"data set {name!r} (data_dir {data_dir!r}) is not one of the known labs {sorted(set(LAB_OF.values()))}")


# --------------------------------------------------------------------------- scoring
def restrict(proba: np.ndarray, class_names: Sequence[str], labels: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """The columns of the model classes among ``labels`` (ignoring case), renormalised, and
    their names in ``labels``' spelling. ValueError when fewer than two are shared."""
    present = {str(label).lower(): str(label) for label in labels}
    columns = [i for i, name in enumerate(class_names) if name.lower() in present]
    if len(columns) < 2:
        raise ValueError(f"model classes {list(class_names)} share fewer than 2 classes with {sorted(present.values())}")
    kept = np.asarray(proba, dtype=np.float64)[:, columns]
    kept = kept / np.clip(kept.sum(axis=1, keepdims=True), 1e-12, None)
    return kept, [present[class_names[i].lower()] for i in columns]


def per_cell(proba: np.ndarray, labels: Sequence[str], groups: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """One row per group of copies: the mean of its copies' probabilities and its label."""
    frame = pd.DataFrame(proba).assign(label=list(labels), group=list(groups))
    if (frame.groupby("group")["label"].nunique() > 1).any():
        raise ValueError("a group of copies holds pictures of different labels")
    cells = frame.groupby("group", sort=True)
    return cells[list(range(proba.shape[1]))].mean().to_numpy(), cells["label"].first().tolist()


def bootstrap_interval(y_true: Sequence[str], proba: np.ndarray, class_names: Sequence[str], *,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """95 % percentile intervals of accuracy and balanced accuracy, resampling the scored cells."""
    names = list(class_names)
    y = np.array([names.index(label) for label in y_true])
    draws = np.random.default_rng(seed).integers(0, len(y), size=(resamples, len(y)))
    truth, correct = y[draws], proba.argmax(axis=1)[draws] == y[draws]
    accuracy = correct.mean(axis=1)
    with np.errstate(invalid="ignore"):  # a class missing from a draw has no recall: left out, as sklearn does
        recall = np.stack([(correct & (truth == c)).sum(axis=1) / (truth == c).sum(axis=1) for c in range(len(names))])
    balanced = np.nanmean(recall, axis=0)
    return {"level": 0.95, "resamples": resamples, "unit_resampled": "cell",
            "accuracy": [float(np.percentile(accuracy, 2.5)), float(np.percentile(accuracy, 97.5))],
            "balanced_accuracy": [float(np.percentile(balanced, 2.5)), float(np.percentile(balanced, 97.5))]}


def _scores(y_true: Sequence[str], proba: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1 and recall per class of the arg-max answers."""
    from sklearn import metrics as skm

    names = list(class_names)
    y, pred = np.array([names.index(label) for label in y_true]), proba.argmax(axis=1)
    labels = list(range(len(names)))
    recall = skm.recall_score(y, pred, labels=labels, average=None, zero_division=0)
    return {"n": int(len(y)), "accuracy": float(skm.accuracy_score(y, pred)),
            "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)),
            "macro_f1": float(skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0)),
            "per_class_recall": {name: float(r) for name, r in zip(names, recall)}}


def score_restricted(proba: np.ndarray, class_names: Sequence[str], labels: Sequence[str],
                     groups: Sequence[str] | None = None, *, min_class_cells: int = 0) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, per-class recall and n on the shared classes
    (rows of other labels are left out); with ``groups`` each group of copies counts once
    (``per_cell``), with a bootstrap interval over the groups. A shared class with fewer than
    ``min_class_cells`` rows is left out as well, rows and model column: ``classes_left_out``
    names each with its count (``{}`` when none)."""
    model_classes = {str(name).lower() for name in class_names}
    left_out = too_few_cells([label for label in labels if str(label).lower() in model_classes], min_class_cells)
    kept_rows = [i for i, label in enumerate(labels) if str(label) not in left_out]
    labels = [labels[i] for i in kept_rows]
    groups = None if groups is None else [groups[i] for i in kept_rows]
    kept, names = restrict(np.asarray(proba)[kept_rows], class_names, labels)
    spelling = {name.lower(): name for name in names}
    shared = [i for i, label in enumerate(labels) if str(label).lower() in spelling]
    kept, labels = kept[shared], [spelling[str(labels[i]).lower()] for i in shared]
    n_images = len(labels)
    if groups is not None:
        kept, labels = per_cell(kept, labels, [groups[i] for i in shared])
    return {"unit": "cell" if groups is not None else "image", "n_images": n_images, "classes": names,
            "min_class_cells": min_class_cells, "classes_left_out": left_out,
            **_scores(labels, kept, names),
            "interval": bootstrap_interval(labels, kept, names) if groups is not None else None}


# --------------------------------------------------------------------------- a run on every other lab
@dataclass
class CrossLabResult:
    """``records``: one per scored target source (keys ``RECORD_KEYS``); ``skipped``: source,
    reason for each target source not scored (a lab the run trained on, no shared classes)."""

    records: list[dict[str, Any]]
    skipped: list[dict[str, str]]


def _checkpoints(run_dir: Path, checkpoint: str) -> list[Path]:
    folds = fold_dirs(run_dir)
    paths = [fold / checkpoint for fold in folds] if folds else [run_dir / checkpoint]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"no kept checkpoint to score on other labs: {', '.join(missing)} missing")
    return paths


def _decoded(source: TargetSource, rows: pd.DataFrame, image_size: int, cache_dir: Any,
             num_workers: int) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """The rows that decoded, their uint8 images, and a note per picture that did not."""
    from bloodcell_lib.data import cache

    cached = cache.load_or_build_cache(rows, image_size, cache_dir=cache_dir, num_workers=num_workers,
                                       progress=False)
    ok = np.asarray(cached.ok, dtype=bool)
    notes = [f"{source.name}: {path} not scored: {reason}" for path, reason in cached.failed]
    return rows[ok].reset_index(drop=True), cached.images[np.flatnonzero(ok)], notes


def _score_checkpoint(path: Path, sources: Sequence[TargetSource], rows_of: Callable, *, batch_size: int,
                      cache_dir: Any, num_workers: int) -> tuple[dict[str, dict[str, Any]], list[dict[str, str]], set[str]]:
    """Scores of one checkpoint per target source it may be scored on, and the skipped ones."""
    from bloodcell_lib.evaluation.predict import predict_views
    from bloodcell_lib.modeling.loaded import load_checkpoint

    loaded = load_checkpoint(path)
    config = loaded.config
    try:
        labs = trained_labs(config)
    except ValueError as err:
        return {}, [{"source": s.name, "reason": f"not scored: {err}"} for s in sources], set()
    scores, skipped = {}, []
    for source in sources:
        if source.lab in labs:
            skipped.append({"source": source.name, "reason": f"the run trained on lab '{source.lab}' "
                                                             f"(trained labs: {', '.join(sorted(labs))}): not cross-lab"})
            continue
        start = time.perf_counter()
        rows = rows_of(source, config.get("crop") or "none", crop_size(config))
        rows, images, notes = _decoded(source, rows, loaded.image_size, cache_dir, num_workers)
        # One view, no test-time augmentation: 8 views of every other lab's pictures for every
        # experiment would cost the build minutes; the held-out lab of a leave-one-lab-out run is
        # also its own test split, scored with TTA where the experiment says so.
        proba = predict_views(loaded, images, batch_size=batch_size, tta=False)[0]
        try:
            score = score_restricted(proba, loaded.class_names, rows["label"].astype(str).tolist(),
                                     rows["group"].astype(str).tolist() if source.per_cell else None,
                                     min_class_cells=source.min_class_cells)
        except ValueError as err:
            skipped.append({"source": source.name, "reason": f"not scored: {err}"})
            continue
        scores[source.name] = {**score, "notes": notes, "seconds": round(time.perf_counter() - start, 2)}
    return scores, skipped, labs


def _mean_over_folds(per_fold: list[dict[str, Any]]) -> dict[str, Any]:
    """One record from the folds' scores: the mean of each number (the folds' own in ``folds``)."""
    first = per_fold[0]
    if len(per_fold) == 1:
        return {**first, "folds": None}
    mean = {key: float(np.mean([s[key] for s in per_fold])) for key in MATRIX_METRICS}
    recall = {name: float(np.mean([s["per_class_recall"][name] for s in per_fold])) for name in first["per_class_recall"]}
    return {**first, **mean, "per_class_recall": recall, "seconds": round(sum(s["seconds"] for s in per_fold), 2),
            "folds": [{key: s[key] for key in MATRIX_METRICS} for s in per_fold], "interval": None}


def score_other_labs(run_dir: str | os.PathLike, *, experiment: str | None = None,
                     sources: Sequence[TargetSource] = TARGET_SOURCES, checkpoint: str = KEPT_CHECKPOINT,
                     batch_size: int = 64, cache_dir: str | os.PathLike | None = None,
                     num_workers: int = 2, per_class: int = 0) -> CrossLabResult:
    """Score the kept checkpoint of ``run_dir`` (each fold's, for cross-validation: the numbers
    are then fold means) on every target source of a lab the run did not train on.
    ``per_class``: at most this many pictures of each class per source (0: all; the smoke
    profile's subset, so a smoke build stays quick)."""
    from bloodcell_lib.data.datasets import rows_per_class

    run_dir = Path(run_dir)
    tables: dict[tuple, pd.DataFrame] = {}

    def rows_of(source: TargetSource, crop: str, margin: float) -> pd.DataFrame:
        key = (source.name, crop if crop in ("cell", "stain", "nucleus", "window") else "none", margin)
        if key not in tables:
            tables[key] = rows_per_class(source.rows(crop, margin), per_class, seed=0)
        return tables[key]

    per_source: dict[str, list[dict[str, Any]]] = {}
    for path in _checkpoints(run_dir, checkpoint):
        scores, skipped, labs = _score_checkpoint(path, sources, rows_of, batch_size=batch_size,
                                                  cache_dir=cache_dir, num_workers=num_workers)
        for name, score in scores.items():
            per_source.setdefault(name, []).append({**score, "train_labs": sorted(labs)})
    records = [{"experiment": experiment or run_dir.name, "test_source": name, **_mean_over_folds(scores)}
               for name, scores in per_source.items()]
    return CrossLabResult(records=records, skipped=skipped)


# --------------------------------------------------------------------------- record, matrix, targets
def record_fields(result: CrossLabResult) -> dict[str, Any]:
    """What the experiment record gains: ``cross_lab`` (the records, ``RECORD_KEYS``),
    ``cross_lab_skipped``, and flat ``cross_lab_<source>_<metric>`` numbers for ``TARGETS``."""
    fields: dict[str, Any] = {"cross_lab": [{key: r.get(key) for key in RECORD_KEYS} for r in result.records],
                              "cross_lab_skipped": list(result.skipped)}
    for r in result.records:
        for metric in MATRIX_METRICS:
            fields[f"cross_lab_{r['test_source'].replace('-', '_')}_{metric}"] = r[metric]
    return fields


def gather(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every experiment record's ``cross_lab`` rows, in record order (metrics.json ``cross_lab``)."""
    return [dict(row) for record in records for row in record.get("cross_lab") or []]


def matrix_frame(rows: Sequence[dict[str, Any]], metric: str | None = None) -> pd.DataFrame:
    """Train experiment x test source: one column per (source, metric), or per source for one ``metric``."""
    if not rows:
        return pd.DataFrame(columns=["experiment"])
    frame = pd.DataFrame(rows)
    metrics = [metric] if metric else list(MATRIX_METRICS)
    wide = frame.pivot_table(index="experiment", columns="test_source", values=metrics, sort=False)
    wide.columns = [source if metric else f"{source} {name}" for name, source in wide.columns]
    labs = frame.groupby("experiment", sort=False)["train_labs"].first().map(", ".join).rename("train labs")
    return pd.concat([labs, wide], axis=1).reset_index()


def in_lab_fields(predictions: pd.DataFrame, run_dir: str | os.PathLike, class_names: Sequence[str]) -> dict[str, Any]:
    """``in_lab_<source>_<metric>`` (and ``_n``) of a multi-source run's held-out predictions
    (``evaluate``'s: path, label, prob_<class>), per ``source`` column of its split.csv (the
    first fold's for cross-validation), each on the classes that source has: e.g. the general
    model on the PBC test part. Empty for a single-source run."""
    from bloodcell_lib.data.splits import load_split

    folds = fold_dirs(run_dir)
    table = load_split(Path(folds[0] if folds else run_dir) / "split.csv")
    sources = predictions["path"].map(table.drop_duplicates("path").set_index("path")["source"])
    fields: dict[str, Any] = {}
    if sources.nunique() < 2:
        return fields
    for source, rows in predictions.groupby(sources, sort=True):
        score = score_restricted(rows[[f"prob_{c}" for c in class_names]].to_numpy(), class_names,
                                 rows["label"].astype(str).tolist())
        prefix = f"in_lab_{str(source).replace('-', '_')}"
        fields.update({f"{prefix}_{metric}": score[metric] for metric in (*MATRIX_METRICS, "n")})
    return fields


def detail_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One line per cross-lab record: what was counted (unit, n) and the scores, with the
    bootstrap interval where the unit is a cell of several copies, and the classes left out of
    the score for having fewer than ``min_class_cells`` cells there."""
    def interval(row: dict[str, Any], metric: str) -> str:
        bounds = (row.get("interval") or {}).get(metric)
        return f"{bounds[0]:.3f}-{bounds[1]:.3f}" if bounds else ""

    def left_out(row: dict[str, Any]) -> str:
        return ", ".join(f"{name} ({n} < {row['min_class_cells']} cells)"
                         for name, n in (row.get("classes_left_out") or {}).items())

    return pd.DataFrame([{"experiment": r["experiment"], "test source": r["test_source"], "unit": r["unit"],
                          "n": r["n"], "images": r["n_images"], "accuracy": r["accuracy"],
                          "accuracy 95% CI": interval(r, "accuracy"), "balanced accuracy": r["balanced_accuracy"],
                          "balanced accuracy 95% CI": interval(r, "balanced_accuracy"), "macro-F1": r["macro_f1"],
                          "classes left out": left_out(r), "seconds": r["seconds"]} for r in rows])


def lab_target_rows(targets: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of a metrics document's ``targets`` about other labs (leave-one-lab-out, in-lab general)."""
    return [row for row in targets if str(row["metric"]).startswith(("cross_lab_", "in_lab_"))]
