"""Conformal prediction sets: for each cell, the classes that hold its true class with a
stated probability (split conformal prediction with the "LAC" score 1 - p(true class);
Sadinle, Lei & Wasserman 2019; Angelopoulos & Bates 2021, section 1).

The threshold ``qhat`` is the ceil((n + 1)(1 - alpha)) / n empirical quantile of the n
validation cells' scores 1 - p(true class) (calibrated probabilities). A cell's set is
every class with p >= 1 - qhat, so for new cells exchangeable with the validation cells
the set holds the true class with probability >= 1 - alpha. The guarantee is marginal
(over cells, not per class) and only for cells like the validation cells: on another
lab's images the coverage is measured, not promised. With fewer than 1/alpha - 1
validation cells no such quantile exists and every set is all classes (qhat = 1).
The top class always belongs to the set, so no set is empty; that can only raise coverage.

The checkpoint's ``conformal`` entry: {"method": "lac", "alpha", "fitted_on": "val", "n",
"qhat", "val": set_summary on those cells}. Test data never chooses it.

The quantile is written out (a few lines) rather than taken from mapie, crepes or torchcp:
those wrap the same one-line quantile around their own estimator objects, and the
checkpoint needs the number, not the object.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

ALPHA = 0.05  # sets hold the true class of 95 % of cells like the validation cells
SET_SEPARATOR = " | "


def conformal_threshold(proba: np.ndarray, labels: np.ndarray, alpha: float = ALPHA) -> float:
    """``qhat``: the split-conformal quantile of 1 - p(true class) over these cells."""
    proba, labels = np.asarray(proba, dtype=np.float64), np.asarray(labels)
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1); got {alpha}")
    if proba.ndim != 2 or len(proba) != len(labels) or len(labels) == 0:
        raise ValueError(f"conformal_threshold needs probabilities [N, K] and N labels; got "
                         f"{proba.shape} and {len(labels)}")
    n = len(labels)
    rank = math.ceil((n + 1) * (1 - alpha))
    if rank > n:
        return 1.0
    scores = np.sort(1.0 - proba[np.arange(n), labels])
    return float(scores[rank - 1])


def conformal_entry(proba: np.ndarray, labels: np.ndarray, alpha: float = ALPHA) -> dict[str, Any]:
    """The checkpoint's ``conformal`` entry fitted on these (validation) probabilities."""
    entry = {"method": "lac", "alpha": float(alpha), "fitted_on": "val", "n": int(len(labels)),
             "qhat": conformal_threshold(proba, labels, alpha)}
    entry["val"] = set_summary(prediction_sets(proba, entry), labels)
    return entry


def prediction_sets(proba: np.ndarray, entry: dict[str, Any]) -> np.ndarray:
    """bool [N, K]: class k is in cell i's set (p >= 1 - qhat, and always the top class)."""
    proba = np.asarray(proba, dtype=np.float64)
    sets = proba >= 1.0 - float(entry["qhat"])
    sets[np.arange(len(proba)), proba.argmax(axis=1)] = True
    return sets


def set_summary(sets: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
    """Mean set size and share of single-class sets; with ``labels`` (class indices; -1 or
    any index outside the classes = a cell type the model has no class for, never covered)
    the empirical coverage: the share of cells whose set holds the true class."""
    sets = np.asarray(sets, dtype=bool)
    n = len(sets)
    sizes = sets.sum(axis=1)
    out: dict[str, Any] = {"n": int(n), "mean_size": float(sizes.mean()) if n else None,
                           "singleton_share": float((sizes == 1).mean()) if n else None}
    if labels is not None:
        labels = np.asarray(labels)
        known = (labels >= 0) & (labels < sets.shape[1])
        covered = np.zeros(n, dtype=bool)
        covered[known] = sets[np.flatnonzero(known), labels[known]]
        out["coverage"] = float(covered.mean()) if n else None
    return out


def pooled_set_summary(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The ``set_summary`` of disjoint groups of cells taken together (the folds of a
    cross-validation, each with its own threshold): their means weighted by cells."""
    n = sum(s["n"] for s in summaries)
    out: dict[str, Any] = {"method": summaries[0].get("method"), "alpha": summaries[0].get("alpha"), "n": n}
    for key in ("coverage", "mean_size", "singleton_share"):
        if n and all(s.get(key) is not None for s in summaries):
            out[key] = sum(s[key] * s["n"] for s in summaries) / n
    return out


def set_labels(sets: np.ndarray, proba: np.ndarray, class_names: Sequence[str]) -> list[str]:
    """Each cell's set as text, most probable class first ("neutrophil | monocyte")."""
    order = np.argsort(-np.asarray(proba, dtype=np.float64), axis=1, kind="stable")
    return [SET_SEPARATOR.join(class_names[k] for k in row_order if inside[k])
            for row_order, inside in zip(order, np.asarray(sets, dtype=bool))]
