"""Review flags that hold for a lab: refitted on the lab's own labelled cells by cross-fitting.

A model fine-tuned on a lab's cells (``adapt``) carries its parent's temperature and review
thresholds, fitted on the parent lab's validation cells, and its parent's k-NN feature bank
no longer matches its features (``training.adapt.adapted_checkpoint`` drops it, so the flags
fall back to energy). With at least ``MIN_LABELS`` labelled cells, ``adapt`` refits them for
the lab without scoring a cell with a model that learnt it (cross-fitting):

1. the labelled cells are split into ``FOLDS`` stratified folds (seeded);
2. for each fold, the model (after the same BatchNorm step) is fine-tuned on the other folds
   with the same recipe and scores the held-out fold: its logits, and its k-NN distance to
   the other folds' features (the bank it would have);
3. the temperature (``modeling.calibration``), the confidence threshold and the OOD
   thresholds (``modeling.review``) and the conformal threshold (``modeling.conformal``) are
   fitted on those out-of-fold scores of every labelled cell, exactly as ``training.calibrate``
   fits them on validation cells;
4. the final model is fine-tuned on all labelled cells and its feature bank is the features of
   all of them (the lab's cells: a cell unlike every labelled cell of the lab is flagged).

Each fold's model learnt from fewer cells than the final one, so its out-of-fold scores are
a little worse: the thresholds err on the side of flagging more. With so few cells the
0.5 %-error confidence threshold rests on a handful of mistakes; the notes say so.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from bloodcell_lib.evaluation.features import logits_features
from bloodcell_lib.modeling import calibration, conformal, review
from bloodcell_lib.modeling.loaded import LoadedModel
from bloodcell_lib.modeling.neighbours import NEIGHBOURS, bank_entry, knn_distance, normalise
from bloodcell_lib.training.adapt import AdaptRecipe, fine_tune

MIN_LABELS = 20  # below this, the parent's calibration and thresholds are kept (and the notes say so)
FOLDS = 3
CELLS_PER_NEIGHBOUR = 20  # the lab's bank is small: k = 1 per 20 bank cells, at most NEIGHBOURS


def bank_neighbours(n_bank: int) -> int:
    """k of the k-NN score for a bank of ``n_bank`` lab cells."""
    return int(max(1, min(NEIGHBOURS, n_bank // CELLS_PER_NEIGHBOUR)))


def cross_fitted_scores(loaded: LoadedModel, images: torch.Tensor, labels: torch.Tensor,
                        recipe: AdaptRecipe, folds: int = FOLDS) -> tuple[np.ndarray, np.ndarray, int]:
    """(out-of-fold logits [N, K], out-of-fold k-NN distances [N], k) of every labelled cell;
    ``model`` is left with the weights it came with."""
    model = loaded.model
    from sklearn.model_selection import StratifiedKFold

    start = {name: value.clone() for name, value in model.state_dict().items()}
    y = labels.numpy()
    logits = np.zeros((len(y), len(loaded.class_names)), dtype=np.float32)
    knn = np.zeros(len(y))
    k = bank_neighbours(len(y) - -(-len(y) // folds))  # the smallest training part
    with warnings.catch_warnings():  # a class with fewer cells than folds is simply absent from some folds
        warnings.simplefilter("ignore", UserWarning)
        parts = list(StratifiedKFold(folds, shuffle=True, random_state=recipe.seed).split(np.zeros(len(y)), y))
    try:
        for train_rows, held_rows in parts:
            model.load_state_dict(start)
            fine_tune(loaded, images[train_rows], labels[train_rows], recipe)
            bank = normalise(logits_features(loaded, images[train_rows])[1])
            held_logits, held_features = logits_features(loaded, images[held_rows])
            logits[held_rows] = held_logits
            knn[held_rows] = knn_distance(held_features, bank, min(k, len(bank))).numpy()
    finally:
        model.load_state_dict(start)
    return logits, knn, k


def lab_entries(logits: np.ndarray, knn: np.ndarray, labels: np.ndarray, bank_features: torch.Tensor,
                class_names: list[str], k: int, folds: int = FOLDS) -> dict[str, Any]:
    """The checkpoint's ``calibration``, ``review``, ``conformal`` and ``feature_bank`` entries
    fitted on the out-of-fold scores of the lab's labelled cells (``bank_features``: the final
    model's features of all of them)."""
    labels = np.asarray(labels)
    fitted_on = f"lab labels (cross-fitted, {folds} folds)"
    entry = {**calibration.temperature_entry(logits, labels), "fitted_on": fitted_on}
    proba = calibration.softmax(logits, entry["temperature"])
    rev = review.review_entry(proba, labels, {review.OOD_SCORE: review.energy_score(logits), "knn": knn})
    counts = {name: int(n) for name, n in zip(class_names, np.bincount(labels, minlength=len(class_names))) if n}
    bank = {**bank_entry(bank_features, counts, k), "fitted_on": "lab labels"}
    return {"calibration": entry, "review": {**rev, "fitted_on": fitted_on},
            "conformal": {**conformal.conformal_entry(proba, labels), "fitted_on": fitted_on}, "feature_bank": bank}


def refit_for_lab(loaded: LoadedModel, images: torch.Tensor, labels: torch.Tensor,
                  recipe: AdaptRecipe, folds: int = FOLDS) -> tuple[dict[str, Any] | None, list[str], list[dict]]:
    """Fine-tune ``model`` on all labelled cells (in place) and, with at least ``MIN_LABELS``
    of them, fit the lab's review entries by cross-fitting first. Returns (entries or None,
    notes, the final fine-tuning's per-epoch history)."""
    if len(labels) < MIN_LABELS:
        history = fine_tune(loaded, images, labels, recipe)
        return None, [f"only {len(labels)} labelled cell(s) (< {MIN_LABELS}): temperature and review thresholds "
                      "are the parent's, fitted on another lab; the review flags use energy (the parent's "
                      "feature bank does not fit the adapted model)"], history
    logits, knn, k = cross_fitted_scores(loaded, images, labels, recipe, folds)
    history = fine_tune(loaded, images, labels, recipe)
    entries = lab_entries(logits, knn, labels.numpy(), logits_features(loaded, images)[1],
                          list(loaded.class_names), k, folds)
    cal, rev = entries["calibration"], entries["review"]
    notes = [f"review flags refitted for the lab on {len(labels)} labelled cells by {folds}-fold cross-fitting: "
             f"temperature {cal['temperature']:.3f} (ECE {cal['ece_before']:.3f} -> {cal['ece_after']:.3f}), "
             f"review below confidence {rev['confidence_threshold']:.3f} or k-NN distance (k = {k}, bank of "
             f"{len(labels)} lab cells) above {rev['ood_threshold']:.3f}; out-of-fold accepted "
             f"{rev['val']['n_accepted']} of {rev['val']['n']}"]
    if len(labels) < 200:
        notes.append(f"the thresholds rest on {len(labels)} cells: rough; label more cells to firm them up")
    return entries, notes, history
