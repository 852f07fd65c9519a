"""review_display.py: before/after reliability figures, the review and stranger tables and
the record entries, from metrics shaped as evaluate writes them."""
from __future__ import annotations

import numpy as np
import pandas as pd

from bloodcell_lib.evaluation.metrics import compute_metrics
from bloodcell_lib.reporting import plots, review_display

CLASSES = ["a", "b", "c"]
LABELS = ["a", "b", "b", "c"]


def _metrics():
    proba = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.1, 0.7]])
    m = compute_metrics(LABELS, proba, CLASSES)
    raw = compute_metrics(LABELS, (proba + 1) / 4, CLASSES)
    m["calibration"] = {"method": "temperature", "temperature": 0.5, "fitted_on": "val", "n": 40, "applied": True,
                        "uncalibrated": {"ece": raw["ece"], "log_loss": raw["log_loss"], "reliability": raw["reliability"]}}
    m["review"] = {"n": 4, "n_accepted": 1, "n_review": 3, "coverage": 0.25, "n_low_confidence": 3,
                   "n_unlike_training": 0, "n_wrong": 1, "accuracy_accepted": 1.0, "wrong_flagged_share": 1.0,
                   "thresholds": {"target_error": 0.005, "confidence_threshold": 0.85, "ood_score": "energy",
                                  "ood_threshold": -1.0}}
    return m


def test_reliability_before_and_after():
    m = _metrics()
    figs = review_display.reliability_figures(m)
    assert len(figs) == 2
    assert "Before calibration" in figs[0][0].axes[0].get_title()
    assert f"{m['calibration']['uncalibrated']['ece']:.3f}" in figs[0][2]
    m["calibration"]["applied"] = False
    assert len(review_display.reliability_figures(m)) == 1
    pooled = {**m, "calibration": {"method": "per fold", "applied": True, "ece_floor": {"mean": 0.03, "p95": 0.05}}}
    (only,) = review_display.reliability_figures(pooled)
    assert "own validation part" in only[2] and "would measure ECE 0.030" in only[2]


def test_tables_and_record_entries():
    m = _metrics()
    table = review_display.review_table(m)
    assert table.loc[0, "coverage"] == 0.25 and table.loc[0, "confidence threshold"] == 0.85
    assert "note" in review_display.review_table({}).columns
    report = {"lisc": {"n": 5, "auroc": {"energy": 0.9}, "review": {"coverage": 0.2, "n_wrong": 4,
                                                                    "wrong_flagged_share": 0.75}}}
    rows = review_display.strangers_table(report)
    assert rows.loc[0, "AUROC energy"] == 0.9 and rows.loc[0, "flagged"] == 0.8
    entries = review_display.record_entries(m, report)
    assert entries["calibration"]["test_ece"] == m["ece"]
    assert entries["calibration"]["test_ece_uncalibrated"] == m["calibration"]["uncalibrated"]["ece"]
    assert "uncalibrated" not in entries["calibration"] and entries["strangers"] == report


def test_sets_table_lists_the_test_split_and_each_stranger_set():
    m = {"conformal": {"alpha": 0.05, "n": 4, "coverage": 0.75, "mean_size": 1.5, "singleton_share": 0.5}}
    report = {"lisc": {"n": 5, "sets": {"n": 5, "coverage": 0.4, "mean_size": 2.2, "singleton_share": 0.2}},
              "bccd": {"n": 0}}
    table = review_display.sets_table(m, report)
    assert table["cells"].tolist() == ["test split", "lisc"]
    assert table.loc[0, "stated coverage"] == 0.95 and table.loc[1, "coverage"] == 0.4
    assert "note" in review_display.sets_table({}, report).columns
    assert review_display.record_entries(m, report)["conformal"] == m["conformal"]


def test_risk_coverage_plot_marks_the_operating_point():
    frame = pd.DataFrame({"label": ["a", "b", "b"], "predicted": ["a", "b", "a"], "confidence": [0.9, 0.8, 0.6]})
    fig = plots.plot_risk_coverage(frame, {"coverage": 0.67, "accuracy_accepted": 1.0})
    ax = fig.axes[0]
    assert len(ax.lines) == 2 and "coverage 0.670" in ax.get_legend().get_texts()[1].get_text()
