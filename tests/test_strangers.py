"""strangers.py: labels the model has no class for count as unknown, a lab that shares the
experiment's images is no stranger, and the AUROC table is built from the logits given."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bloodcell_lib.evaluation import strangers
from bloodcell_lib.modeling.loaded import LoadedModel
from bloodcell_lib.modeling.review import energy_score


def test_labels_matched_ignoring_case_and_unknown_is_minus_one():
    got = strangers.label_indices_or_unknown(pd.Series(["NEUTROPHIL", "blast", "basophil"]),
                                             ["basophil", "neutrophil"])
    assert got.tolist() == [1, -1, 0]


def test_stranger_sets_skip_the_experiments_own_images(monkeypatch):
    asked = []

    def fake_manifest(name, root=None, *, crop=None, **kwargs):
        asked.append(name)
        table = pd.DataFrame({"path": [f"{name}/{i}.png" for i in range(10)], "label": ["a"] * 5 + ["b"] * 5})
        return type("M", (), {"table": table})()

    monkeypatch.setattr("bloodcell_lib.data.datasets.load_manifest", fake_manifest)
    monkeypatch.setattr(strangers, "OTHER_LABS", (("bccd", "bccd", "cell"),))
    assert list(strangers.stranger_tables("kaggle", [], trained={"bccd"})) == []  # Kaggle is BCCD augmented
    assert list(strangers.stranger_tables("multi", [], trained={"pbc", "bccd"})) == []  # a lab it trained on
    tables = strangers.stranger_tables("pbc", ["b"], trained={"pbc"}, test_fraction=0.4)
    assert list(tables) == ["pbc-b", "bccd"]
    assert len(tables["pbc-b"]) == 2 and set(tables["pbc-b"]["label"]) == {"b"}


def test_stranger_metrics_auroc_from_logits(monkeypatch):
    inside = np.array([[9.0, 0.0], [8.0, 0.0], [7.0, 1.0]])
    outside = np.array([[0.1, 0.0], [0.2, 0.3]])
    table = pd.DataFrame({"path": ["x", "y"], "label": ["cat", "a"]})
    loaded = LoadedModel(None, class_names=["a", "b"], data_config={}, image_size=32, temperature=1.0,
                         review={"confidence_threshold": 0.9, "ood_score": "energy", "ood_threshold": -5.0},
                         conformal={"alpha": 0.1, "qhat": 0.0})  # one-class sets
    monkeypatch.setattr(strangers, "scores_of_table", lambda loaded, t, **k: (
        outside, strangers.ood_scores(outside, energy_score(outside), loaded), t))
    got = strangers.stranger_metrics(loaded, strangers.ood_scores(inside, energy_score(inside), loaded),
                                     {"lab": table})["lab"]
    assert got["n"] == 2 and got["auroc"]["energy"] == pytest.approx(1.0)
    assert got["review"]["n_review"] == 2 and got["review"]["wrong_flagged_share"] == 1.0
    # the "cat" cell has no class: never covered; the "a" cell's set is its top class "b"
    assert got["sets"] == {"n": 2, "mean_size": 1.0, "singleton_share": 1.0, "coverage": 0.0}
