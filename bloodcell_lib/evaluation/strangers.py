"""Cells the model was not trained on: how well the OOD score tells them from in-lab test
cells, and what the review flags do with them.

"Strangers" are a class the experiment left out with ``drop_classes`` (the open-set test:
a cell type with no class, like a blast), and other labs' images of the same classes
(LISC, BCCD crops). Each set is scored through the one inference path
(``predict.logit_views`` via the uint8 cache, so BCCD's annotated boxes are cropped) and
compared with the in-lab test cells by AUROC for each score: the k-NN feature distance
(``modeling.neighbours``; the one the review flags use when the checkpoint has a feature
bank), energy, max logit and max softmax probability (negated, so higher is stranger).
Nothing here feeds back into thresholds: they were fixed on validation data.
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pandas as pd

from bloodcell_lib.modeling.loaded import LoadedModel

# Other labs' crops of PBC's classes: (name, data set, crop). Kaggle is BCCD augmented, so
# the originals stand for that lab.
OTHER_LABS = (("lisc", "lisc", "none"), ("bccd", "bccd", "cell"))


def scores_of_table(loaded: LoadedModel, table: pd.DataFrame, *,
                    cache_dir: Any = None) -> tuple[np.ndarray, dict[str, np.ndarray], pd.DataFrame]:
    """Raw logits [N, K] and OOD scores (``ood_scores``; no test-time augmentation) of the
    decodable rows of ``table`` (columns path, label, optional box) and those rows;
    undecodable ones are named on stderr."""
    from bloodcell_lib.data import cache
    from bloodcell_lib.evaluation.predict import scored_views

    cached = cache.load_or_build_cache(table, loaded.image_size, cache_dir=cache_dir, progress=False)
    ok = np.asarray(cached.ok, dtype=bool)
    for path, reason in cached.failed:
        print(f"WARNING: {path} is not scored: {reason}", file=sys.stderr, flush=True)
    logits, flag_score = scored_views(loaded, cached.images[np.flatnonzero(ok)])
    return logits[0], ood_scores(logits[0], flag_score[0], loaded), table[ok].reset_index(drop=True)


def ood_scores(logits: np.ndarray, flag_score: np.ndarray, loaded: LoadedModel) -> dict[str, np.ndarray]:
    """Candidate OOD scores per cell, each higher = stranger: the review flags' own
    (``flag_score``, named by ``LoadedModel.ood_score_name``) and the logit-based ones."""
    from bloodcell_lib.modeling.review import energy_score

    return {loaded.ood_score_name: flag_score, "energy": energy_score(logits), "max_logit": -logits.max(axis=1),
            "max_softmax": -loaded.probabilities(logits).max(axis=1)}


def label_indices_or_unknown(labels: pd.Series, class_names: list[str]) -> np.ndarray:
    """Class indices (names matched ignoring case: BCCD spells NEUTROPHIL); -1 for a label
    the model has no class for (always a wrong answer)."""
    index = {name.lower(): i for i, name in enumerate(class_names)}
    return np.array([index.get(str(label).lower(), -1) for label in labels], dtype=np.int64)


def stranger_tables(dataset: str, drop_classes: list[str], *, trained: set[str], crop: str = "none",
                    seed: int = 0, test_fraction: float = 0.2) -> dict[str, pd.DataFrame]:
    """Tables of the stranger sets: ``<dataset>-<class>`` for each class the experiment
    dropped (a seeded ``test_fraction`` share of its images, as many as a test split would
    hold; the class never entered training or validation), then the other labs' crops,
    except labs in ``trained`` (``crosslab.trained_labs`` of the run: BCCD is no stranger
    to a Kaggle model, nor LISC to one trained on it). A set whose data is missing is left
    out with a warning."""
    from bloodcell_lib.data.datasets import load_manifest
    from bloodcell_lib.evaluation.crosslab import LAB_OF

    tables: dict[str, pd.DataFrame] = {}
    if drop_classes:
        own = load_manifest(dataset, crop=crop).table
        for name in drop_classes:
            rows = own[own["label"] == name]
            tables[f"{dataset}-{name}"] = rows.sample(frac=test_fraction, random_state=seed).reset_index(drop=True)
    for name, lab_set, lab_crop in OTHER_LABS:
        if LAB_OF[lab_set] in trained:
            continue
        try:
            tables[name] = load_manifest(lab_set, crop=lab_crop).table
        except (FileNotFoundError, ValueError) as err:
            print(f"WARNING: stranger set {name!r} left out: {err or 'data not found'}", file=sys.stderr, flush=True)
    return tables


def stranger_metrics(loaded: LoadedModel, inside: dict[str, np.ndarray],
                     tables: dict[str, pd.DataFrame], **kwargs: Any) -> dict[str, dict[str, Any]]:
    """Per stranger set: n, AUROC of each OOD score against the in-lab test cells' scores
    (``inside``, from ``scores_of_table``), ``review_summary`` of the checkpoint's flags on the set,
    and ``sets``: what its conformal prediction sets cover there (a measurement: the
    guarantee holds only for cells like the validation cells)."""
    from bloodcell_lib.modeling.conformal import prediction_sets, set_summary
    from bloodcell_lib.modeling.review import auroc, review_summary

    out = {}
    for name, table in tables.items():
        logits, scores, rows = scores_of_table(loaded, table, **kwargs)
        entry: dict[str, Any] = {"n": int(len(rows)),
                                 "auroc": {k: auroc(inside[k], scores[k]) for k in scores} if len(rows) else None}
        if loaded.review and len(rows):
            labels = label_indices_or_unknown(rows["label"], list(loaded.class_names))
            proba = loaded.probabilities(logits)
            entry["review"] = review_summary(proba, labels, scores[loaded.ood_score_name], loaded.review)
            if loaded.conformal:
                entry["sets"] = set_summary(prediction_sets(proba, loaded.conformal), labels)
        out[name] = entry
    return out


def stranger_report(cfg: Any, *, split: str = "test", device: str = "cpu") -> dict[str, dict[str, Any]]:
    """``stranger_metrics`` of the experiment ``cfg``'s kept checkpoint against its
    ``split`` rows. A cross-validated experiment is represented by its first fold."""
    from pathlib import Path

    from bloodcell_lib.data.datasets import rows_per_class
    from bloodcell_lib.data.splits import load_split
    from bloodcell_lib.evaluation.crosslab import labs_in_run
    from bloodcell_lib.modeling.rundir import KEPT_CHECKPOINT, fold_dirs
    from bloodcell_lib.modeling.loaded import load_checkpoint

    run_dir = (fold_dirs(cfg.run_dir) or [Path(cfg.run_dir)])[0]
    loaded = load_checkpoint(run_dir / KEPT_CHECKPOINT, device)
    table = load_split(run_dir / "split.csv")
    _, inside, _ = scores_of_table(loaded, table[table["split"].astype(str) == split].reset_index(drop=True))
    try:  # a lab in the run's split (trained on, or held out as its test split) is no stranger
        known = labs_in_run(loaded.config)
    except ValueError as err:
        print(f"WARNING: every other lab is scored as a stranger, though {err}", file=sys.stderr, flush=True)
        known = set()
    tables = stranger_tables(cfg.dataset, list(cfg.drop_classes), trained=known, crop=cfg.crop, seed=cfg.seed,
                             test_fraction=cfg.test_fraction or 0.2)
    # The experiment's subset (the smoke profile's) applies to the strangers too: 0 keeps all.
    tables = {name: rows_per_class(table, cfg.subset_per_class, seed=cfg.seed) for name, table in tables.items()}
    return stranger_metrics(loaded, inside, tables)
