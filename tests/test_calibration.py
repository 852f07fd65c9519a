"""Calibration and review flags: temperature scaling recovers a known temperature, the
review thresholds come from validation data only (test rows poisoned: same result), fit()
leaves a calibrated checkpoint_best.pt (temperature, review thresholds, prediction sets),
and the review summary counts what it should."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bloodcell_lib.data import cache, splits
from bloodcell_lib.modeling import calibration, review
from bloodcell_lib.training import calibrate, train

from test_train import make_tiny_dataset, tiny_config


def _sampled(temperature: float, n: int = 5000, k: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits / temperature): the true T is known."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, k))
    proba = calibration.softmax(logits, temperature)
    labels = (rng.random((n, 1)) > proba.cumsum(axis=1)).sum(axis=1)  # inverse-CDF draw per row
    return logits, labels


@pytest.mark.parametrize("true_t", [0.5, 2.0])
def test_fit_temperature_recovers_the_true_temperature(true_t):
    logits, labels = _sampled(true_t)
    fitted = calibration.fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_t, rel=0.1)
    entry = calibration.temperature_entry(logits, labels)
    assert entry["ece_after"] < 0.02 < entry["ece_before"]
    assert entry["fitted_on"] == "val" and entry["n"] == len(labels)


def test_fit_temperature_rejects_bad_input():
    with pytest.raises(ValueError, match="labels must be class indices"):
        calibration.fit_temperature(np.zeros((3, 2)), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="logits"):
        calibration.fit_temperature(np.zeros((3, 2)), np.array([0, 1]))


def test_ece_of_a_perfectly_calibrated_and_an_overconfident_model():
    proba = np.array([[0.8, 0.2]] * 10)
    assert calibration.ece(proba, np.array([0] * 8 + [1] * 2)) == pytest.approx(0.0)
    assert calibration.ece(proba, np.array([0] * 5 + [1] * 5)) == pytest.approx(0.3)


def test_ece_floor_of_a_small_set_is_far_from_zero():
    proba = calibration.softmax(np.random.default_rng(0).normal(0, 2, (300, 4)))
    small, large = calibration.ece_floor(proba[:60]), calibration.ece_floor(np.tile(proba, (10, 1)))
    assert small["mean"] > 2 * large["mean"] > 0  # shrinks with n, never 0
    assert small["p95"] > small["mean"]


def test_confidence_threshold_meets_the_target_with_most_coverage():
    conf = np.array([0.99, 0.98, 0.97, 0.96, 0.60])
    correct = np.array([1, 1, 0, 1, 1], dtype=bool)
    assert review.confidence_threshold(conf, correct, 0.0) == 0.98  # the two above the first error
    assert review.confidence_threshold(conf, correct, 0.2) == 0.60  # 1 error in 5 accepted
    two_errors = np.array([1, 1, 0, 0, 1], dtype=bool)  # error rates 0, 0, 1/3, 1/2, 2/5
    assert review.confidence_threshold(conf, two_errors, 0.34) == 0.97
    # ties are accepted together: 0.9 x 3 with one error cannot reach 0 errors
    assert review.confidence_threshold(np.array([0.9, 0.9, 0.9]), np.array([1, 0, 1], bool), 0.0) > 0.9


def test_review_flags_and_summary():
    entry = {"confidence_threshold": 0.9, "ood_threshold": -5.0}
    proba = np.array([[0.95, 0.05], [0.6, 0.4], [0.99, 0.01], [0.5, 0.5]])
    ood = np.array([-8.0, -8.0, -1.0, -1.0])
    flagged, reasons = review.review_flags(proba, ood, entry)
    assert flagged.tolist() == [False, True, True, True]
    assert reasons == ["", "low_confidence", "unlike_training", "low_confidence+unlike_training"]
    summary = review.review_summary(proba, np.array([0, 1, -1, 0]), ood, entry)
    assert summary["n_accepted"] == 1 and summary["coverage"] == 0.25
    assert summary["accuracy_accepted"] == 1.0
    assert summary["n_wrong"] == 2 and summary["wrong_flagged_share"] == 1.0  # the unknown (-1) cell counts wrong
    assert review.summary_line(summary) == "4 cells: 1 accepted, 3 to review (2 low confidence, 2 unlike training)"


def test_accuracy_at_coverage_reads_the_curve():
    confidence = np.array([0.99, 0.98, 0.97, 0.96, 0.5])
    correct = np.array([True, True, False, True, False])
    assert review.accuracy_at_coverage(confidence, correct, 0.8) == 0.75  # the 4 most confident
    assert review.accuracy_at_coverage(confidence, correct, 0.5) == pytest.approx(2 / 3)  # at least half: 3 cells
    assert review.accuracy_at_coverage(confidence, correct, 1.0) == 0.6


def test_risk_coverage_and_auroc():
    curve = review.risk_coverage(np.array([0.9, 0.5, 0.8]), np.array([1, 0, 1], bool))
    assert curve["coverage"].tolist() == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert curve["accuracy"].tolist() == pytest.approx([1.0, 1.0, 2 / 3])
    assert review.auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0


# --------------------------------------------------------------------------- calibrate_run

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    data = make_tiny_dataset(root / "data", per_class=16)
    cfg = tiny_config(root, data, epochs=2, use_cache=False)
    return train.fit(cfg, progress=False)


def _entries(run_dir):
    ckpt = torch.load(run_dir / "checkpoint_best.pt", map_location="cpu", weights_only=True)
    return ckpt["calibration"], ckpt["review"], ckpt["conformal"]


def test_fit_leaves_a_calibrated_checkpoint(tiny_run):
    cal, rev, sets = _entries(tiny_run.run_dir)
    n_val = int((splits.load_split(tiny_run.run_dir / "split.csv")["split"] == "val").sum())
    assert cal["method"] == "temperature" and cal["fitted_on"] == "val" and cal["n"] == n_val
    assert calibration.MIN_TEMPERATURE <= cal["temperature"] <= calibration.MAX_TEMPERATURE
    assert rev["fitted_on"] == "val" and rev["n"] == n_val and rev["target_error"] == review.TARGET_ERROR
    assert rev["val"]["n"] == n_val
    assert sets["fitted_on"] == "val" and sets["n"] == n_val and sets["val"]["coverage"] >= 1 - sets["alpha"]
    # the k-NN bank: a class-balanced sample of the training rows only, the flags' score
    bank = torch.load(tiny_run.run_dir / "checkpoint_best.pt", map_location="cpu", weights_only=True)["feature_bank"]
    table = splits.load_split(tiny_run.run_dir / "split.csv")
    n_train = table[table["split"] == "train"]["label"].value_counts().to_dict()
    assert bank["fitted_on"] == "train" and bank["n_per_class"] == {c: min(n, 200) for c, n in n_train.items()}
    assert len(bank["features"]) == sum(bank["n_per_class"].values())
    assert rev["ood_score"] == "knn" and set(rev["ood_thresholds"]) == {"knn", "energy"}


def test_calibration_never_reads_test_rows(tiny_run, monkeypatch):
    run_dir = tiny_run.run_dir
    before = _entries(run_dir)
    table = splits.load_split(run_dir / "split.csv")
    test = table["split"] == "test"
    assert test.any()
    # poison the test rows: missing files, shuffled labels; calibration must not notice
    table.loc[test, "path"] = [str(run_dir / f"missing_{i}.png") for i in range(int(test.sum()))]
    table.loc[test, "label"] = table.loc[test, "label"].sample(frac=1.0, random_state=1).to_numpy()
    splits.save_split(table, run_dir / "split.csv")
    seen = []
    real = cache.load_or_build_cache

    def spy(rows, *args, **kwargs):
        seen.append(set(rows["split"]))
        return real(rows, *args, **kwargs)

    monkeypatch.setattr(cache, "load_or_build_cache", spy)
    calibrate.calibrate_run(run_dir)
    assert seen and all("test" not in s for s in seen)
    assert _entries(run_dir) == before


def test_thresholds_follow_the_validation_labels(tiny_run, tmp_path):
    """The same model, other validation labels: another temperature (the fit reads val)."""
    run_dir = tiny_run.run_dir
    ckpt = torch.load(run_dir / "checkpoint_best.pt", map_location="cpu", weights_only=True)
    logits, labels = np.random.default_rng(0).normal(0, 2, (50, 3)), np.zeros(50, dtype=int)
    a = calibrate.calibrate_checkpoint(ckpt, logits, labels)
    b = calibrate.calibrate_checkpoint(ckpt, logits, logits.argmax(1))
    assert a["calibration"]["temperature"] != b["calibration"]["temperature"]
    assert b["review"]["val"]["n_low_confidence"] == 0  # every validation answer right: none doubtful
    assert a["review"]["val"]["coverage"] < b["review"]["val"]["coverage"]
    assert a["conformal"]["qhat"] > b["conformal"]["qhat"]  # wrong answers on val: wider sets
