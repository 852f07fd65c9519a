"""What 03_evaluate shows about trusting the answers: reliability before and after
calibration, the review flags on the test split, the stranger sets (left-out class, other
labs) and the conformal prediction sets, plus the record entries they add (``calibration``,
``review``, ``strangers``, ``conformal``)."""
from __future__ import annotations

from typing import Any, Mapping

import pandas as pd


def reliability_figures(metrics: Mapping[str, Any]) -> list[tuple[Any, str, str]]:
    """(figure, alt, caption) of the raw softmax's and the calibrated reliability diagram."""
    from bloodcell_lib.reporting.plots import plot_reliability

    cal = metrics.get("calibration") or {}
    raw = cal.get("uncalibrated")
    floor = (f" A perfectly calibrated model with these confidences would measure ECE "
             f"{cal['ece_floor']['mean']:.3f} on this many cells (95th percentile {cal['ece_floor']['p95']:.3f})."
             if cal.get("ece_floor") else "")
    if cal.get("method") == "per fold":
        return [(plot_reliability(metrics), "Reliability diagram (folds pooled)",
                 f"Each fold's model temperature-scaled on its own validation part, test cells pooled: ECE "
                 f"{metrics['ece']:.3f}." + floor)]
    if not raw or not cal.get("applied"):
        return [(plot_reliability(metrics), "Reliability diagram (uncalibrated)",
                 f"Raw softmax, no calibration in this checkpoint: ECE {metrics['ece']:.3f}." + floor)]
    before = {"reliability": raw["reliability"], "ece": raw["ece"], "n": metrics.get("n")}
    return [(plot_reliability(before, title=f"Before calibration: raw softmax (ECE = {raw['ece']:.3f})"),
             "Reliability diagram before calibration", f"Raw softmax on the test split: ECE {raw['ece']:.3f}."),
            (plot_reliability(metrics, title=f"After temperature scaling, T = {cal['temperature']:.3f} "
                                             f"(ECE = {metrics['ece']:.3f})"),
             "Reliability diagram after calibration",
             f"Calibrated (T fitted on {cal['n']} validation images): ECE {metrics['ece']:.3f} on the test split."
             + floor)]


def review_table(metrics: Mapping[str, Any]) -> pd.DataFrame:
    """The review flags' thresholds (chosen on validation) and what they did on this split."""
    review = metrics.get("review")
    if not review:
        return pd.DataFrame([{"note": "no review thresholds (uncalibrated checkpoint, or pooled folds)"}])
    limits = review["thresholds"]
    return pd.DataFrame([{"target errors among accepted (val)": limits["target_error"],
                          "confidence threshold": limits["confidence_threshold"],
                          "OOD score": limits.get("ood_score", "energy"),
                          "OOD threshold": limits["ood_threshold"], "cells": review["n"],
                          "accepted": review["n_accepted"], "coverage": review["coverage"],
                          "accuracy of accepted": review["accuracy_accepted"],
                          "accuracy of the 95 % most confident": review.get("accuracy_at_95_coverage"),
                          "low confidence": review["n_low_confidence"],
                          "unlike training": review["n_unlike_training"],
                          "wrong answers flagged": review["wrong_flagged_share"]}])


def strangers_table(report: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """One row per stranger set: AUROC of each score against the in-lab test cells, and the flags."""
    rows = []
    for name, entry in report.items():
        review = entry.get("review") or {}
        rows.append({"set": name, "cells": entry["n"],
                     **{f"AUROC {score}": value for score, value in (entry.get("auroc") or {}).items()},
                     "flagged": 1 - review["coverage"] if review.get("coverage") is not None else None,
                     "wrong answers": review.get("n_wrong"),
                     "wrong answers flagged": review.get("wrong_flagged_share")})
    return pd.DataFrame(rows)


def sets_table(metrics: Mapping[str, Any], strangers: Mapping[str, Mapping[str, Any]] | None) -> pd.DataFrame:
    """The conformal prediction sets (threshold from validation) on the test split and on
    each stranger set: coverage, against the stated 1 - alpha, and set sizes."""
    sets = metrics.get("conformal")
    if not sets:
        return pd.DataFrame([{"note": "no prediction sets (uncalibrated checkpoint)"}])
    target = 1 - sets["alpha"]
    groups = [("test split", sets)] + [(name, entry["sets"]) for name, entry in (strangers or {}).items()
                                       if entry.get("sets")]
    return pd.DataFrame([{"cells": name, "n": group["n"], "stated coverage": target,
                          "coverage": group.get("coverage"), "mean set size": group["mean_size"],
                          "one-class sets": group["singleton_share"]} for name, group in groups])


def record_entries(metrics: Mapping[str, Any], strangers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Record keys: calibration (T, ECE before/after on the test split), review (the test
    split's review summary), strangers (``strangers.stranger_report``) and conformal (the
    prediction sets on the test split)."""
    cal = dict(metrics.get("calibration") or {})
    raw = cal.pop("uncalibrated", {}) or {}
    return {"calibration": {**cal, "test_ece": metrics.get("ece"), "test_ece_uncalibrated": raw.get("ece")},
            "review": metrics.get("review"), "strangers": dict(strangers) if strangers is not None else None,
            "conformal": metrics.get("conformal")}
