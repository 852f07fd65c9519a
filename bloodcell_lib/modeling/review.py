"""Which cells a technologist should review, and why.

An automatic differential is a pre-classification: a cell is accepted when the model is
sure of it and it looks like what the model was trained on; every other cell is flagged
with its reason:

- ``low_confidence``: the calibrated max probability is below a threshold chosen on
  validation data so that at most ``target_error`` (default 0.5 %) of the accepted
  validation cells are wrong;
- ``unlike_training``: the out-of-distribution score is above the ``ood_quantile``
  (default 99th percentile) of the validation cells' scores. The score is the distance to
  the k-th nearest training cell in feature space (``modeling.neighbours``, "knn") when the
  checkpoint holds a feature bank, else energy (-logsumexp of the raw logits: high for
  pictures that excite no class); ``ood_score`` in the entry names it. The score is computed
  on the model's input after its input contract (crop), so a picture framed or scaled unlike
  the training pictures scores as what the model really sees;
- ``no_cell_found``: the model was trained on crops around a nucleus and none was found in
  the picture, so what it classified is not the view it was trained on;
- ``unlike_training_scale``: (``crop: window`` models, which see cells at the picture's own
  pixel scale) the nucleus is smaller or larger than the validation cells of the predicted
  class ever were (``scale_entry``): another microscope's magnification, or a mistaken class.

The thresholds live in the checkpoint's ``review`` entry (``review_entry``); test data
never chooses them.
"""
from __future__ import annotations

from typing import Any

import numpy as np

TARGET_ERROR = 0.005
OOD_QUANTILE = 0.99
OOD_SCORE = "energy"
LOW_CONFIDENCE, UNLIKE_TRAINING, NO_CELL, OFF_SCALE = ("low_confidence", "unlike_training", "no_cell_found",
                                                       "unlike_training_scale")
INPUT_CHECKS = (NO_CELL, OFF_SCALE)  # flags from the picture itself, besides the model's scores
# scale_entry: the range of nucleus sizes per class seen on validation, widened by this factor
# either way (a class's extreme cells are rare in a few hundred validation cells).
SCALE_QUANTILES = (0.005, 0.995)
SCALE_WIDEN = 1.2


def energy_score(logits: np.ndarray) -> np.ndarray:
    """-logsumexp of the raw logits per row (Liu et al. 2020): the higher, the stranger."""
    z = np.asarray(logits, dtype=np.float64)
    top = z.max(axis=-1)
    return -(top + np.log(np.exp(z - top[..., None]).sum(axis=-1)))


def confidence_threshold(confidence: np.ndarray, correct: np.ndarray, target_error: float) -> float:
    """The lowest threshold t such that, of the cells with confidence >= t, at most a
    ``target_error`` share is wrong (the largest coverage meeting the target). When even
    the most confident cell alone misses it: just above the highest confidence (all flagged)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    wrong = ~np.asarray(correct, dtype=bool)
    if len(confidence) == 0:
        raise ValueError("confidence_threshold needs at least one validation cell")
    order = np.argsort(-confidence, kind="stable")
    conf_sorted = confidence[order]
    error_rate = np.cumsum(wrong[order]) / np.arange(1, len(order) + 1)
    # a threshold accepts all tied confidences at once: only the last of a tie group counts
    group_end = np.append(conf_sorted[1:] < conf_sorted[:-1], True)
    ok = np.flatnonzero(group_end & (error_rate <= target_error))
    if len(ok) == 0:
        return float(np.nextafter(conf_sorted[0], np.inf))
    return float(conf_sorted[ok[-1]])


def review_entry(proba: np.ndarray, labels: np.ndarray, ood: dict[str, np.ndarray], *,
                 target_error: float = TARGET_ERROR, ood_quantile: float = OOD_QUANTILE) -> dict[str, Any]:
    """The checkpoint's ``review`` entry chosen on validation (calibrated) probabilities,
    labels (class indices) and OOD scores by name (``energy`` always, ``knn`` with a
    feature bank). The flags use ``knn`` when present; every score's threshold is kept, so
    a model whose bank no longer fits its features (few-shot adaptation) falls back to
    energy (``with_score``)."""
    proba = np.asarray(proba, dtype=np.float64)
    correct = proba.argmax(axis=1) == np.asarray(labels)
    threshold = confidence_threshold(proba.max(axis=1), correct, target_error)
    thresholds = {name: float(np.quantile(np.asarray(score, dtype=np.float64), ood_quantile))
                  for name, score in ood.items()}
    entry = with_score({"fitted_on": "val", "n": int(len(correct)), "target_error": float(target_error),
                        "confidence_threshold": threshold, "ood_quantile": float(ood_quantile),
                        "ood_thresholds": thresholds}, "knn" if "knn" in ood else OOD_SCORE)
    entry["val"] = review_summary(proba, labels, ood[entry["ood_score"]], entry)
    return entry


def with_score(review: dict[str, Any], name: str) -> dict[str, Any]:
    """``review`` flagging by OOD score ``name`` (one of its ``ood_thresholds``)."""
    return {**review, "ood_score": name, "ood_threshold": review["ood_thresholds"][name]}


def scale_entry(nucleus_px: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """The review entry's ``scale``: per class, the nucleus sizes (longer side, picture pixels)
    of the validation cells between SCALE_QUANTILES, widened by SCALE_WIDEN either way. Cells
    whose nucleus was not found (NaN) are left out; a class with none has no range."""
    nucleus_px, labels = np.asarray(nucleus_px, dtype=np.float64), np.asarray(labels)
    ranges = {}
    for k, name in enumerate(class_names):
        sizes = nucleus_px[(labels == k) & np.isfinite(nucleus_px)]
        if len(sizes):
            low, high = np.quantile(sizes, SCALE_QUANTILES)
            ranges[name] = [float(low / SCALE_WIDEN), float(high * SCALE_WIDEN)]
    return {"measure": "nucleus longer side, picture pixels", "quantiles": list(SCALE_QUANTILES),
            "widen": SCALE_WIDEN, "n": int(np.isfinite(nucleus_px).sum()), "per_class": ranges}


def off_scale(proba: np.ndarray, nucleus_px: np.ndarray, scale: dict[str, Any], class_names: list[str]) -> np.ndarray:
    """bool [N]: the nucleus lies outside the predicted class's validation range (``scale_entry``)."""
    predicted = np.asarray(proba).argmax(axis=1)
    out = np.zeros(len(predicted), dtype=bool)
    for i, (k, px) in enumerate(zip(predicted, np.asarray(nucleus_px, dtype=np.float64))):
        bounds = scale["per_class"].get(class_names[k])
        out[i] = bool(bounds and np.isfinite(px) and not bounds[0] <= px <= bounds[1])
    return out


def review_flags(proba: np.ndarray, ood: np.ndarray, review: dict[str, Any] | None,
                 checks: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, list[str]]:
    """(needs_review bool [N], review_reason [N]: "", a reason, or several joined by "+").
    ``checks``: INPUT_CHECKS flags by name (bool [N]) found on the pictures themselves."""
    proba = np.asarray(proba, dtype=np.float64)
    if not review:
        return np.zeros(len(proba), dtype=bool), [""] * len(proba)
    flags = {LOW_CONFIDENCE: proba.max(axis=1) < review["confidence_threshold"],
             UNLIKE_TRAINING: np.asarray(ood, dtype=np.float64) > review["ood_threshold"],
             **{name: np.asarray(flag, dtype=bool) for name, flag in (checks or {}).items()}}
    reasons = ["+".join(name for name, flag in flags.items() if flag[i]) for i in range(len(proba))]
    return np.logical_or.reduce(list(flags.values())), reasons


def unlike_calibration(ood: np.ndarray, review: dict[str, Any], checks: dict[str, np.ndarray] | None = None
                       ) -> np.ndarray:
    """bool [N]: cells that do not look like the validation cells the thresholds (and conformal
    sets) were fitted on: OOD score above its threshold, or an input check failed. What was
    promised on validation data says nothing about them."""
    strange = np.asarray(ood, dtype=np.float64) > review["ood_threshold"]
    return np.logical_or.reduce([strange, *(np.asarray(f, dtype=bool) for f in (checks or {}).values())])


def review_summary(proba: np.ndarray, labels: np.ndarray | None, ood: np.ndarray,
                   review: dict[str, Any], checks: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """What the flags do on a set of cells: counts, coverage (accepted share), and with
    ``labels`` (class indices; -1 or any index outside the classes = a cell type the model
    has no class for, always wrong) accuracy of the accepted cells and the share of wrong
    answers that were flagged. Usable on another lab's images (cross-lab evaluation)."""
    proba = np.asarray(proba, dtype=np.float64)
    flagged, reasons = review_flags(proba, ood, review, checks)
    n, n_flagged = len(proba), int(flagged.sum())
    out: dict[str, Any] = {"n": n, "n_accepted": n - n_flagged, "n_review": n_flagged,
                           "coverage": (n - n_flagged) / n if n else None,
                           "n_low_confidence": sum(LOW_CONFIDENCE in r for r in reasons),
                           "n_unlike_training": sum(UNLIKE_TRAINING in r.split("+") for r in reasons),
                           **{f"n_{name}": sum(name in r.split("+") for r in reasons) for name in INPUT_CHECKS}}
    if labels is not None:
        wrong = proba.argmax(axis=1) != np.asarray(labels)
        accepted_wrong = int((wrong & ~flagged).sum())
        out.update({"n_wrong": int(wrong.sum()),
                    "accuracy_accepted": 1 - accepted_wrong / (n - n_flagged) if n > n_flagged else None,
                    "wrong_flagged_share": float((wrong & flagged).sum() / wrong.sum()) if wrong.any() else None})
    return out


def summary_line(summary: dict[str, Any]) -> str:
    """'312 cells: 297 accepted, 15 to review (9 low confidence, 8 unlike training)', and with
    prediction sets ('sets', see evaluation.predict.unlabelled_review) '; 95% prediction
    sets for the 304 cells like the calibration cells: 290 of one class, mean size 1.08 (the
    coverage does not apply to the other 8)'. The stated coverage is a promise about cells like
    the validation cells only, so it is never claimed for the others."""
    line = (f"{summary['n']} cells: {summary['n_accepted']} accepted, {summary['n_review']} to review "
            f"({summary['n_low_confidence']} low confidence, {summary['n_unlike_training']} unlike training"
            + "".join(f", {summary[f'n_{name}']} {name.replace('_', ' ')}" for name in INPUT_CHECKS
                      if summary.get(f"n_{name}")) + ")")
    sets = summary.get("sets")
    if sets is None:
        return line
    outside = sets.get("n_outside", 0)
    if not sets["n"]:
        return line + (f"; {1 - sets['alpha']:.0%} prediction sets: the coverage does not apply "
                       "(no cell is like the calibration cells)")
    line += (f"; {1 - sets['alpha']:.0%} prediction sets for the {sets['n']} cells like the calibration cells: "
             f"{round(sets['singleton_share'] * sets['n'])} of one class, mean size {sets['mean_size']:.2f}")
    return line + (f" (the coverage does not apply to the other {outside})" if outside else "")


def risk_coverage(confidence: np.ndarray, correct: np.ndarray) -> dict[str, np.ndarray]:
    """Accepting the k most confident cells, k = 1..N: coverage k/N, accuracy of the
    accepted, and the confidence of the k-th (the threshold that accepts them)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    order = np.argsort(-confidence, kind="stable")
    k = np.arange(1, len(order) + 1)
    return {"coverage": k / len(order), "accuracy": np.cumsum(np.asarray(correct, dtype=bool)[order]) / k,
            "threshold": confidence[order]}


def accuracy_at_coverage(confidence: np.ndarray, correct: np.ndarray, coverage: float = 0.95) -> float:
    """Accuracy of the most confident ``coverage`` share of the cells (at least that share):
    a point of the ``risk_coverage`` curve, read off these cells, not a threshold chosen
    on them for later use."""
    curve = risk_coverage(confidence, correct)
    return float(curve["accuracy"][int(np.searchsorted(curve["coverage"], coverage - 1e-12))])


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve of telling ``out`` from ``in`` cells by a score (higher =
    out): the chance that a random out cell scores above a random in cell."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return float(roc_auc_score(y, np.r_[in_scores, out_scores]))
