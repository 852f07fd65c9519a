"""Conformal prediction sets: the split-conformal quantile gives the stated coverage on new
cells drawn like the validation cells (and not a free pass: too few validation cells give
all-class sets), the top class is always in the set, and folds pool by cells."""
from __future__ import annotations

import numpy as np
import pytest

from bloodcell_lib.modeling import calibration, conformal


def _draw(n: int, seed: int, k: int = 5, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated probabilities and labels drawn from them (a model that means what it says)."""
    rng = np.random.default_rng(seed)
    proba = calibration.softmax(rng.normal(0, 2.5, (n, k)), temperature)
    labels = (rng.random((n, 1)) > proba.cumsum(axis=1)).sum(axis=1)
    return proba, np.minimum(labels, k - 1)


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_sets_cover_new_cells_at_the_stated_rate(alpha):
    val_proba, val_labels = _draw(2000, seed=0)
    entry = conformal.conformal_entry(val_proba, val_labels, alpha)
    test_proba, test_labels = _draw(20000, seed=1)
    summary = conformal.set_summary(conformal.prediction_sets(test_proba, entry), test_labels)
    # >= 1 - alpha on average over validation draws; one draw of 2,000 cells moves the
    # achieved coverage by about 0.01 (sd), so three sd either side
    assert 1 - alpha - 0.03 <= summary["coverage"] <= 1 - alpha + 0.03
    assert entry["val"]["coverage"] >= 1 - alpha
    assert 1 < summary["mean_size"] < 5


def test_a_wrong_model_needs_bigger_sets():
    """The same validation cells, labels the model gets wrong more often: a larger threshold."""
    proba, labels = _draw(1000, seed=2)
    shuffled = np.random.default_rng(3).permutation(labels)
    sharp = conformal.conformal_threshold(proba, labels, 0.1)
    blurred = conformal.conformal_threshold(proba, shuffled, 0.1)
    assert blurred > sharp
    assert conformal.set_summary(conformal.prediction_sets(proba, {"qhat": blurred}))["mean_size"] > \
        conformal.set_summary(conformal.prediction_sets(proba, {"qhat": sharp}))["mean_size"]


def test_too_few_validation_cells_give_every_class():
    proba, labels = _draw(10, seed=4)  # ceil(11 * 0.95) = 11 > 10: no finite quantile
    entry = conformal.conformal_entry(proba, labels, 0.05)
    assert entry["qhat"] == 1.0
    assert conformal.prediction_sets(proba, entry).all()


def test_top_class_always_in_the_set_and_labels_read_most_probable_first():
    proba = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    sets = conformal.prediction_sets(proba, {"qhat": 0.0})  # p >= 1: nothing but the top class
    assert sets.sum(axis=1).tolist() == [1, 1] and sets[0, 0] and sets[1, 2]
    wide = conformal.prediction_sets(proba, {"qhat": 0.75})  # p >= 0.25
    assert conformal.set_labels(wide, proba, ["a", "b", "c"]) == ["a | b", "c"]


def test_unknown_classes_are_never_covered_and_folds_pool_by_cells():
    sets = np.array([[True, False], [True, True], [False, True]])
    summary = conformal.set_summary(sets, np.array([0, -1, 1]))
    assert summary["coverage"] == pytest.approx(2 / 3) and summary["singleton_share"] == pytest.approx(2 / 3)
    pooled = conformal.pooled_set_summary([{"n": 1, "coverage": 1.0, "mean_size": 1.0, "singleton_share": 1.0},
                                           {"n": 3, "coverage": 0.0, "mean_size": 2.0, "singleton_share": 0.0}])
    assert pooled["n"] == 4 and pooled["coverage"] == 0.25 and pooled["mean_size"] == 1.75


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="alpha"):
        conformal.conformal_threshold(np.ones((3, 2)) / 2, np.zeros(3, dtype=int), alpha=1.5)
    with pytest.raises(ValueError, match="probabilities"):
        conformal.conformal_threshold(np.ones((3, 2)) / 2, np.zeros(2, dtype=int))
