"""Classification metrics for one evaluation, and their mean/sd over cross-validation folds.

Everything scikit-learn covers comes from scikit-learn (accuracy, balanced accuracy, F1,
per-class precision/recall/F1/support, confusion matrix, one-vs-rest ROC AUC, log loss).
Expected calibration error (ECE) is multi-class, which ``sklearn.calibration`` does not
cover, so it is computed here from 15 equal-width confidence bins with numpy.

``compute_metrics`` returns plain Python types only (no numpy scalars), so the dict can go
straight to ``fileio.atomic_write_json``.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
from sklearn import metrics as skm

ECE_BINS = 15

# Scalar metrics that summarize_folds reports as mean and sd.
SCALAR_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_ovr", "log_loss", "ece")


def label_indices(y_true: Sequence[Any], class_names: Sequence[str]) -> np.ndarray:
    """Labels as class indices; accepts indices or class-name strings."""
    values = np.asarray(list(y_true), dtype=object)
    if values.size == 0:
        return np.zeros(0, dtype=np.int64)
    if all(isinstance(v, str) for v in values):
        lookup = {name: i for i, name in enumerate(class_names)}
        unknown = sorted({v for v in values if v not in lookup})
        if unknown:
            raise ValueError(f"labels {unknown} are not among the class names {list(class_names)}")
        return np.array([lookup[v] for v in values], dtype=np.int64)
    try:
        idx = values.astype(np.int64)
    except (TypeError, ValueError) as err:
        raise ValueError("y_true must hold class indices or class-name strings") from err
    if not np.array_equal(idx, values.astype(float)):
        raise ValueError("y_true holds non-integer class indices")
    bad = idx[(idx < 0) | (idx >= len(class_names))]
    if bad.size:
        raise ValueError(f"class indices {sorted(set(bad.tolist()))} out of range for {len(class_names)} classes")
    return idx


def _check_proba(proba: Any, n: int, k: int) -> np.ndarray:
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2 or p.shape != (n, k):
        raise ValueError(f"proba must have shape (n_samples={n}, n_classes={k}); got {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("proba holds NaN or infinite values")
    if np.any(p < 0):
        raise ValueError("proba holds negative values (pass softmax probabilities, not logits)")
    sums = p.sum(axis=1, keepdims=True)
    if np.any(sums <= 0):
        raise ValueError("a row of proba sums to 0")
    # Renormalise float32 round-off so scikit-learn's sum-to-one checks pass.
    return p / sums


def _float(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> list[dict]:
    """Equal-width bins over (0, 1]: each with its edges, count, mean confidence and accuracy.

    Bin i holds confidences in (i/n_bins, (i+1)/n_bins]; a confidence of exactly 0 goes in
    the first bin. Empty bins have confidence and accuracy None.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # right=True: value v goes to bin i with edges[i] < v <= edges[i+1].
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(which, weights=correct, minlength=n_bins)
    bins = []
    for i in range(n_bins):
        c = int(counts[i])
        bins.append({
            "lower": float(edges[i]),
            "upper": float(edges[i + 1]),
            "count": c,
            "confidence": float(conf_sum[i] / c) if c else None,
            "accuracy": float(acc_sum[i] / c) if c else None,
        })
    return bins


def expected_calibration_error(bins: list[dict]) -> float:
    """ECE = sum over bins of (count / n) * |accuracy - confidence|."""
    n = sum(b["count"] for b in bins)
    if n == 0:
        return float("nan")
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]))


def compute_metrics(y_true: Sequence[Any], proba: Any, class_names: Sequence[str]) -> dict[str, Any]:
    """All metrics of one evaluation as a JSON-serialisable dict.

    ``y_true``: class indices (or class-name strings); ``proba``: array (n, k) of class
    probabilities whose columns follow ``class_names``. The prediction is the arg-max.

    Keys: n, class_names, accuracy, balanced_accuracy, macro_f1, weighted_f1, log_loss,
    per_class {name: {precision, recall, f1, support, roc_auc}}, confusion_matrix (rows =
    true class, columns = predicted, in class_names order), roc_auc_ovr (macro one-vs-rest,
    None when a class is absent from y_true), roc_auc_ovr_reason (why it is None, else
    None), ece (15 equal-width confidence bins), ece_bins, reliability (list of bins:
    lower, upper, count, confidence, accuracy).
    """
    class_names = [str(c) for c in class_names]
    k = len(class_names)
    if k < 2:
        raise ValueError(f"need at least 2 classes, got {class_names}")
    y = label_indices(y_true, class_names)
    n = int(y.size)
    if n == 0:
        raise ValueError("no samples to score (y_true is empty)")
    p = _check_proba(proba, n, k)
    pred = p.argmax(axis=1)
    labels = list(range(k))

    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true" and zero-division notes are expected on
        # small or partial sets; the numbers below state the outcome explicitly.
        warnings.simplefilter("ignore")
        precision, recall, f1, support = skm.precision_recall_fscore_support(
            y, pred, labels=labels, zero_division=0)
        accuracy = skm.accuracy_score(y, pred)
        balanced = skm.balanced_accuracy_score(y, pred)
        macro_f1 = skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0)
        weighted_f1 = skm.f1_score(y, pred, labels=labels, average="weighted", zero_division=0)
        cm = skm.confusion_matrix(y, pred, labels=labels)
        logloss = skm.log_loss(y, p, labels=labels)

    present = np.bincount(y, minlength=k) > 0
    per_class_auc: list[float | None] = []
    for j in range(k):
        # Defined when class j has both positives and negatives in y_true.
        if present[j] and np.any(y != j):
            per_class_auc.append(_float(skm.roc_auc_score((y == j).astype(int), p[:, j])))
        else:
            per_class_auc.append(None)
    absent = [class_names[j] for j in range(k) if not present[j]]
    if absent:
        roc_auc, auc_reason = None, (
            f"one-vs-rest ROC AUC undefined: class(es) {', '.join(absent)} absent from y_true")
    else:
        roc_auc = _float(skm.roc_auc_score(y, p, multi_class="ovr", average="macro", labels=labels))
        auc_reason = None

    confidence = p.max(axis=1)
    bins = calibration_bins(confidence, pred == y, ECE_BINS)

    per_class = {
        name: {
            "precision": float(precision[j]),
            "recall": float(recall[j]),
            "f1": float(f1[j]),
            "support": int(support[j]),
            "roc_auc": per_class_auc[j],
        }
        for j, name in enumerate(class_names)
    }
    return {
        "n": n,
        "class_names": class_names,
        "accuracy": float(accuracy),
        "balanced_accuracy": float(balanced),
        "macro_f1": float(macro_f1),
        "weighted_f1": float(weighted_f1),
        "log_loss": float(logloss),
        "roc_auc_ovr": roc_auc,
        "roc_auc_ovr_reason": auc_reason,
        "per_class": per_class,
        "confusion_matrix": cm.astype(int).tolist(),
        "ece": expected_calibration_error(bins),
        "ece_bins": ECE_BINS,
        "reliability": bins,
    }


def summarize_folds(fold_metrics: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1) of the scalar metrics over folds.

    Returns {"n_folds", "metrics": {name: {"mean", "sd", "values", "n"}}, "per_class_f1":
    {class: {"mean", "sd"}}}. A metric that is None in some fold (e.g. ROC AUC with a class
    absent) is summarised over the folds where it is defined; "n" says how many.
    """
    fold_metrics = list(fold_metrics)
    if not fold_metrics:
        raise ValueError("summarize_folds needs at least one fold's metrics")

    def stats(values: list[float]) -> dict[str, Any]:
        arr = np.asarray(values, dtype=np.float64)
        return {
            "mean": float(arr.mean()) if arr.size else None,
            "sd": float(arr.std(ddof=1)) if arr.size > 1 else None,
            "values": [float(v) for v in arr],
            "n": int(arr.size),
        }

    summary: dict[str, Any] = {"n_folds": len(fold_metrics), "metrics": {}}
    for name in SCALAR_METRICS:
        values = [m.get(name) for m in fold_metrics]
        values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
        summary["metrics"][name] = stats(values)
    classes = fold_metrics[0].get("class_names") or list(fold_metrics[0].get("per_class", {}))
    summary["per_class_f1"] = {
        c: {key: val for key, val in stats([m["per_class"][c]["f1"] for m in fold_metrics
                                            if c in m.get("per_class", {})]).items() if key != "values"}
        for c in classes
    }
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """One line per metric: ``accuracy  0.912 ± 0.011 (5 folds)``."""
    lines = []
    for name, s in summary["metrics"].items():
        if s["mean"] is None:
            lines.append(f"{name:18s} n/a")
        else:
            sd = f" ± {s['sd']:.3f}" if s["sd"] is not None else ""
            lines.append(f"{name:18s} {s['mean']:.3f}{sd} ({s['n']} folds)")
    return "\n".join(lines)
