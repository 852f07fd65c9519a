"""metrics.py against small cases that can be checked by hand."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bloodcell_lib.evaluation.metrics import (calibration_bins, compute_metrics, expected_calibration_error,
                                   format_summary, summarize_folds)

CLASSES = ["a", "b", "c"]


def one_hot(idx, k=3, hi=1.0):
    p = np.full((len(idx), k), (1 - hi) / (k - 1))
    p[np.arange(len(idx)), idx] = hi
    return p


def test_perfect_predictions():
    y = [0, 1, 2, 0, 1, 2]
    m = compute_metrics(y, one_hot(y), CLASSES)
    assert m["n"] == 6
    assert m["accuracy"] == 1.0
    assert m["balanced_accuracy"] == 1.0
    assert m["macro_f1"] == 1.0
    assert m["roc_auc_ovr"] == 1.0 and m["roc_auc_ovr_reason"] is None
    assert m["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]
    assert m["ece"] == pytest.approx(0.0)
    assert m["per_class"]["b"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2, "roc_auc": 1.0}
    json.dumps(m)  # serialisable as is


def test_hand_checked_confusion_and_per_class():
    # true: a a a b b c ; pred: a a b b c c
    y = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 2, 2]
    m = compute_metrics(y, one_hot(pred, hi=0.8), CLASSES)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]  # rows = true
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    pa = m["per_class"]["a"]
    assert (pa["precision"], pa["recall"], pa["support"]) == (1.0, pytest.approx(2 / 3), 3)
    pb = m["per_class"]["b"]
    assert pb["precision"] == pytest.approx(0.5) and pb["recall"] == pytest.approx(0.5)
    f1 = [2 * 1 * (2 / 3) / (1 + 2 / 3), 0.5, 2 * 0.5 * 1 / 1.5]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    # every prediction has confidence 0.8 -> one bin, accuracy 4/6: ECE = |0.8 - 0.667|
    assert m["ece"] == pytest.approx(abs(0.8 - 4 / 6))
    filled = [b for b in m["reliability"] if b["count"]]
    assert len(filled) == 1 and filled[0]["count"] == 6
    assert filled[0]["lower"] < 0.8 <= filled[0]["upper"]
    assert len(m["reliability"]) == 15


def test_ece_two_bins_known_value():
    conf = np.array([0.95, 0.95, 0.95, 0.95, 0.55, 0.55])
    correct = np.array([1, 1, 1, 0, 1, 0])
    bins = calibration_bins(conf, correct, 15)
    # bin of 0.95: acc 0.75 gap 0.2 weight 4/6; bin of 0.55: acc 0.5 gap 0.05 weight 2/6
    assert expected_calibration_error(bins) == pytest.approx(4 / 6 * 0.2 + 2 / 6 * 0.05)
    assert sum(b["count"] for b in bins) == 6
    # edges: a confidence of exactly 1.0 lands in the last bin, 0 in the first
    edge = calibration_bins(np.array([1.0, 0.0]), np.array([1, 0]), 15)
    assert edge[-1]["count"] == 1 and edge[0]["count"] == 1


def test_string_labels_and_float32_rows():
    proba = one_hot([0, 1, 2]).astype(np.float32) * np.float32(1.0000001)
    m = compute_metrics(["a", "b", "c"], proba, CLASSES)
    assert m["accuracy"] == 1.0


def test_absent_class_gives_auc_none_with_reason():
    y = [0, 0, 1, 1]
    proba = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4]])
    m = compute_metrics(y, proba, CLASSES)
    assert m["roc_auc_ovr"] is None
    assert "c" in m["roc_auc_ovr_reason"] and "absent" in m["roc_auc_ovr_reason"]
    assert m["per_class"]["c"]["roc_auc"] is None
    assert m["per_class"]["a"]["roc_auc"] == pytest.approx(1.0)
    assert m["per_class"]["c"]["support"] == 0


def test_auc_matches_binary_mean():
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2] * 10)
    logits = rng.normal(size=(30, 3)) + np.eye(3)[y]
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = compute_metrics(y, proba, CLASSES)
    per = [m["per_class"][c]["roc_auc"] for c in CLASSES]
    assert m["roc_auc_ovr"] == pytest.approx(np.mean(per))


@pytest.mark.parametrize("bad, match", [
    (np.ones((3, 2)), "shape"),
    (np.array([[np.nan, 0.5, 0.5]] * 3), "NaN"),
    (np.array([[-1.0, 1.0, 1.0]] * 3), "negative"),
])
def test_bad_proba_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics([0, 1, 2], bad, CLASSES)


def test_bad_labels_rejected():
    with pytest.raises(ValueError, match="not among"):
        compute_metrics(["a", "zz", "c"], one_hot([0, 1, 2]), CLASSES)
    with pytest.raises(ValueError, match="out of range"):
        compute_metrics([0, 1, 5], one_hot([0, 1, 2]), CLASSES)
    with pytest.raises(ValueError, match="empty"):
        compute_metrics([], np.zeros((0, 3)), CLASSES)


def test_summarize_folds_mean_sd():
    folds = []
    for acc_pred in ([0, 1, 2, 0], [0, 1, 2, 1]):
        folds.append(compute_metrics([0, 1, 2, 0], one_hot(acc_pred, hi=0.9), CLASSES))
    s = summarize_folds(folds)
    assert s["n_folds"] == 2
    acc = s["metrics"]["accuracy"]
    assert acc["values"] == [1.0, 0.75]
    assert acc["mean"] == pytest.approx(0.875)
    assert acc["sd"] == pytest.approx(np.std([1.0, 0.75], ddof=1))
    assert set(s["per_class_f1"]) == set(CLASSES)
    assert "accuracy" in format_summary(s)
    json.dumps(s)
    # ROC AUC None in one fold: summarised over the others, count says so
    folds.append(compute_metrics([0, 0, 1], one_hot([0, 0, 1], hi=0.9), CLASSES))
    s = summarize_folds(folds)
    assert s["metrics"]["roc_auc_ovr"]["n"] == 2
    with pytest.raises(ValueError):
        summarize_folds([])
