"""Leakage-safe, stratified, seeded splits and the split file that pins them to a run.

A group (byte-identical copies, crops of one smear) always lands in exactly one split,
because a model that saw one copy in training is not being tested on the other. Official
splits (Kaggle's TRAIN/TEST/TEST_SIMPLE) are kept: only ``val`` is carved out of ``train``.

Hold-outs use scikit-learn's StratifiedGroupKFold with k = round(1 / fraction) folds and
keep one fold, so a fraction is rounded to 1/k (0.2 -> 1/5, 0.1 -> 1/10, 0.15 -> 1/7).
"""
from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

from bloodcell_lib.data.catalog import COLUMNS, DROPPED_COLUMNS, Manifest
from bloodcell_lib.data.sources import MIN_CLASS_CELLS, too_few_cells
from bloodcell_lib.core.fileio import atomic_write_text

log = logging.getLogger(__name__)

BOX_COLUMNS = ["xmin", "ymin", "xmax", "ymax"]
SPLIT_FILE_COLUMNS = [column for column in COLUMNS if column != "box"] + BOX_COLUMNS


def _stratified_group_folds(table: pd.DataFrame, k: int, seed: int) -> list[np.ndarray]:
    """Row positions of each of ``k`` stratified, group-disjoint folds.

    Classes smaller than k cannot appear in every fold; sklearn warns about that and still
    spreads them, which is what we want, so that one warning is silenced.
    """
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        return [held for _, held in splitter.split(table, table["label"], table["group"])]


def _holdout(table: pd.DataFrame, fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of about ``fraction`` of the rows, whole groups only, stratified by label.

    Falls back to GroupShuffleSplit (group-safe, not stratified) when the table is too small
    for k stratified folds. Afterwards every class keeps at least one group outside the
    hold-out, so even a class of 3 images can still be trained on.
    """
    if not 0 <= fraction <= 0.5:
        raise ValueError(f"hold-out fraction {fraction!r} must be in [0, 0.5]")
    held = np.zeros(len(table), dtype=bool)
    n_groups = table["group"].nunique()
    if fraction == 0 or n_groups < 2:
        return held
    try:
        positions = _stratified_group_folds(table, max(2, round(1 / fraction)), seed)[0]
    except ValueError:  # fewer groups, or fewer members in every class, than folds
        splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
        positions = next(splitter.split(table, groups=table["group"]))[1]
    held[positions] = True
    labels, groups = table["label"].to_numpy(), table["group"].to_numpy()
    for label in np.unique(labels[held]):
        if held[labels == label].all():
            held[groups == groups[held & (labels == label)][0]] = False
    return held


def _carve(table: pd.DataFrame, pool: np.ndarray, fraction: float, name: str, seed: int) -> pd.DataFrame:
    """Move about ``fraction`` of the rows selected by ``pool`` into split ``name``."""
    positions = np.flatnonzero(pool)
    held = _holdout(table.iloc[positions], fraction, seed)
    table.iloc[positions[held], table.columns.get_loc("split")] = name
    return table


def make_splits(table: pd.DataFrame, *, val_fraction: float, test_fraction: float, seed: int) -> pd.DataFrame:
    """Copy of ``table`` with ``split`` in {train, val, test} (plus kept official splits).

    With official splits, ``val`` is ``val_fraction`` of ``train`` and ``test_fraction`` is
    unused; a table that already has ``val`` is returned unchanged. Without them, both
    fractions are of the whole table. Deterministic for a given seed.
    """
    out = table.reset_index(drop=True).copy()
    official = out["split"] != ""
    if official.any() and not official.all():
        raise ValueError("table mixes rows with and without an official split; cannot split it consistently")
    if official.all():
        if (out["split"] == "val").any():
            return out
        return _carve(out, (out["split"] == "train").to_numpy(), val_fraction, "val", seed)
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves nothing to train on")
    out["split"] = "train"
    out = _carve(out, np.ones(len(out), dtype=bool), test_fraction, "test", seed)
    return _carve(out, (out["split"] == "train").to_numpy(), val_fraction / (1 - test_fraction), "val", seed)


def kfold_splits(table: pd.DataFrame, k: int, *, val_fraction: float, seed: int) -> list[pd.DataFrame]:
    """``k`` copies of ``table``: in copy i fold i is ``test``, ``val`` is carved from the rest.

    Folds are stratified and group-disjoint and together cover every row once;
    ``val_fraction`` is of the whole table. Tables with official splits are refused: pooling
    Kaggle's TRAIN and TEST puts augmented copies of one cell on both sides.
    """
    if (table["split"] != "").any():
        raise ValueError("table has official splits (e.g. Kaggle TRAIN/TEST); k-fold cross-validation would "
                         "pool them and leak augmented copies across folds. Use cv_folds=0 for this data set.")
    if k < 2:
        raise ValueError(f"k = {k} folds: need at least 2")
    base = table.reset_index(drop=True)
    try:
        folds = _stratified_group_folds(base, k, seed)
    except ValueError as err:
        raise ValueError(f"cannot make {k} folds of {base['group'].nunique()} group(s): {err}") from err
    tables = []
    for held in folds:
        out = base.assign(split="train")
        out.iloc[held, out.columns.get_loc("split")] = "test"
        tables.append(_carve(out, (out["split"] == "train").to_numpy(), val_fraction * k / (k - 1), "val", seed))
    return tables


def source_splits(table: pd.DataFrame, *, test_source: str | None, val_fraction: float, test_fraction: float,
                  seed: int) -> pd.DataFrame:
    """A multi-source table's split (column ``source``): every row of ``test_source`` is
    ``test`` (the held-out lab, never seen in training or validation); each other source is
    split on its own, by its own leakage groups, into train and val (and, with no test source,
    test too: ``test_fraction`` of each). So validation, which chooses epochs and methods,
    only ever holds the training labs' pictures."""
    parts = []
    for source, rows in table.groupby("source", sort=False):
        if source == test_source:
            parts.append(rows.assign(split="test"))
        else:
            parts.append(make_splits(rows.assign(split=""), val_fraction=val_fraction, seed=seed,
                                     test_fraction=0.0 if test_source else test_fraction))
    return pd.concat(parts, ignore_index=True)


def placement_entries(table: pd.DataFrame, *, test_source: str | None = None,
                      min_cells: int = MIN_CLASS_CELLS) -> pd.DataFrame:
    """What a split did with each class too small for it, one row (``DROPPED_COLUMNS``) per
    class and source, so that no class changes sides or leaves a score silently:

    * kind ``train-only``: a class of a source that was split (it has val or test rows) whose
      pictures all stayed in train -- too few pictures or leakage groups to hold any out
      (``_holdout`` keeps one group of every class outside a hold-out);
    * kind ``small-class``: such a class spread over some of the splits but missing from others
      (a k-fold fold, a class of two);
    * kind ``unscored-class``: a class of the held-out lab (``test_source``) with fewer than
      ``min_cells`` cells: all of it test, but left out of the leave-one-lab-out scores.
    Rows of another set that only train (``extra_train``) are not a split's doing: none.
    """
    entries = []
    for source, rows in table.groupby("source", sort=True):
        if source == test_source:
            entries += [(f"{source} class {label}", f"{n} picture(s), all test (the held-out lab); fewer than "
                         f"{min_cells}: left out of the leave-one-lab-out scores", "unscored-class")
                        for label, n in too_few_cells(rows["label"], min_cells).items()]
            continue
        present = [name for name in ("train", "val", "test") if (rows["split"] == name).any()]
        if present == ["train"] or "train" not in present:
            continue
        for label, members in rows.groupby("label", sort=True):
            where = members["split"].value_counts()
            missing = [name for name in present if name not in where]
            if not missing:
                continue
            placed = ", ".join(f"{name} {where[name]}" for name in present if name in where)
            entries.append((f"{source} class {label}",
                            f"{len(members)} picture(s) in {members['group'].nunique()} leakage group(s), too few "
                            f"to spread over every split: {placed}, none in {' or '.join(missing)}",
                            "train-only" if list(where.index) == ["train"] else "small-class"))
    return pd.DataFrame(entries, columns=DROPPED_COLUMNS)


# --------------------------------------------------------------------------- split files
def save_split(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the table's contract columns as CSV (atomically); ``box`` as xmin..ymax, empty when None."""
    boxes = pd.DataFrame([box if box is not None else (None,) * 4 for box in table["box"]],
                         columns=BOX_COLUMNS, index=table.index, dtype="Int64")
    frame = pd.concat([table[[column for column in COLUMNS if column != "box"]], boxes], axis=1)
    return atomic_write_text(path, frame.to_csv(index=False))


def load_split(path: str | os.PathLike) -> pd.DataFrame:
    """Inverse of save_split: the table with ``box`` back as None or a tuple of ints."""
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [column for column in SPLIT_FILE_COLUMNS if column not in frame.columns]
    if missing:
        raise ValueError(f"split file {path} lacks column(s) {', '.join(missing)}; found {list(frame.columns)}")
    corners = frame[BOX_COLUMNS].to_numpy()
    frame["box"] = pd.Series([tuple(int(value) for value in row) if row[0] else None for row in corners],
                             index=frame.index, dtype=object)
    return frame[COLUMNS]


def _mismatch(split: pd.DataFrame, table: pd.DataFrame) -> str | None:
    """Why a saved split does not describe ``table`` (same rows: path, label, box), or None."""
    def rows(frame: pd.DataFrame) -> Counter:
        return Counter(zip(frame["path"], frame["label"], frame["box"]))

    in_split, in_table = rows(split), rows(table)
    if in_split == in_table:
        return None
    return (f"{sum((in_split - in_table).values())} row(s) only in the split file, "
            f"{sum((in_table - in_split).values())} row(s) only in the data")


class SplitSettings(Protocol):
    """The settings that decide a run's split (training.config.TrainConfig's fields of the same
    names; named here so that data never imports training)."""

    dataset: str
    split_file: str | None
    resume: bool
    val_fraction: float
    test_fraction: float
    test_source: str | None
    cv_folds: int
    seed: int


def splits_for(cfg: SplitSettings, manifest: Manifest, run_file: str | os.PathLike, *, write: bool = True,
               fold: int | None = None) -> pd.DataFrame:
    """The split a run uses: ``cfg.split_file`` or ``run_file`` (the run's split.csv,
    ``RunDir.split``) if it matches, else a new one, saved as ``run_file``.

    Reusing the saved split is what makes a rerun or a resumed run test on the same images.
    A split file named in the config, or a run being resumed, must match the data (else
    ValueError); a stale run_file is replaced, with a warning. ``fold`` selects fold
    ``fold`` of ``cfg.cv_folds``. Only rank 0 passes ``write=True``; other ranks compute the
    same seeded split without writing.
    """
    run_file = Path(run_file)
    source = Path(cfg.split_file).expanduser() if cfg.split_file else run_file
    if source.is_file():
        saved = load_split(source)
        problem = _mismatch(saved, manifest.table)
        if problem is None:
            if write and source.resolve() != run_file.resolve():
                save_split(saved, run_file)
            return saved
        if cfg.split_file or cfg.resume:
            raise ValueError(f"split file {source} does not match data set '{manifest.name}': {problem}")
        log.warning("%s does not match data set '%s' (%s); making a new split", source, manifest.name, problem)
    elif cfg.split_file:
        raise FileNotFoundError(f"split file {source} (config split_file) does not exist")
    # Rows of another data set (config extra_train) only ever train: every score stays on the
    # experiment's own images, and the split of those is the same as without them.
    # A multi-source set's rows are all its own (each source is split by source_splits).
    own = (manifest.table["source"] == manifest.name) | (cfg.dataset == "multi")
    if cfg.dataset == "multi":
        table = source_splits(manifest.table, test_source=cfg.test_source, val_fraction=cfg.val_fraction,
                              test_fraction=cfg.test_fraction, seed=cfg.seed)
    elif fold is None:
        table = make_splits(manifest.table[own], val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                            seed=cfg.seed)
    else:
        table = kfold_splits(manifest.table[own], cfg.cv_folds, val_fraction=cfg.val_fraction, seed=cfg.seed)[fold]
    table = pd.concat([table, manifest.table[~own].assign(split="train")], ignore_index=True)
    if write:
        save_split(table, run_file)
    return table
