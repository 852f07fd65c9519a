"""neighbours.py: the k-NN distance, the features it reads, the class-balanced bank, and
the review flags falling back to energy where a model has no bank."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from bloodcell_lib.evaluation import predict
from bloodcell_lib.evaluation.predict import scored_views
from bloodcell_lib.modeling.loaded import LoadedModel, calibration_fields
from bloodcell_lib.modeling import neighbours
from bloodcell_lib.modeling.models import create_model, resolve_data_config
from bloodcell_lib.modeling.review import energy_score, review_entry


def test_knn_distance_zero_inside_the_bank_and_sqrt2_when_orthogonal():
    bank = neighbours.normalise(torch.eye(4)[:2].repeat(3, 1))  # e0, e1, each 3 times
    got = neighbours.knn_distance(torch.tensor([[2.0, 0, 0, 0], [0, 0, 0, 5.0], [1.0, 1.0, 0, 0]]), bank, k=3)
    assert got[0] == pytest.approx(0.0, abs=1e-6)  # the length of a feature does not matter
    assert got[1] == pytest.approx(2 ** 0.5)
    assert 0 < got[2] < 1  # between the two
    # with k = 4 the 4th neighbour of e0 is an e1: farther
    assert neighbours.knn_distance(torch.tensor([[1.0, 0, 0, 0]]), bank, k=4)[0] == pytest.approx(2 ** 0.5)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_features_are_the_input_of_the_classifier(name):
    torch.manual_seed(0)
    model = create_model(name, 3, pretrained=False).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, features = neighbours.logits_and_features(model, x)
        head = model.get_submodule(neighbours.head_name(model))
        torch.testing.assert_close(head(features), logits)
        torch.testing.assert_close(logits, model(x))  # the hook is gone afterwards
    assert not head._forward_pre_hooks


def test_bank_rows_are_class_balanced_and_seeded():
    labels = np.array([0] * 500 + [1] * 30 + [2] * 5)
    rows = neighbours.bank_rows(labels, per_class=200, seed=3)
    assert np.bincount(labels[rows]).tolist() == [200, 30, 5]
    assert (rows == neighbours.bank_rows(labels, per_class=200, seed=3)).all()
    assert not (rows == neighbours.bank_rows(labels, per_class=200, seed=4)).all()


def test_scored_views_use_the_bank_and_match_the_scored_model():
    torch.manual_seed(0)
    model = create_model("resnet18", 3, pretrained=False).eval()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    loaded = LoadedModel(model, class_names=["a", "b", "c"], image_size=32,
                         data_config=resolve_data_config("resnet18", 32))
    plain_logits, plain_ood = scored_views(loaded, images[:2])
    np.testing.assert_allclose(plain_ood[0], energy_score(plain_logits[0]))  # no review: energy
    from bloodcell_lib.data.transforms import normalize_batch

    with torch.no_grad():
        _, features = neighbours.logits_and_features(model, normalize_batch(images, loaded.data_config))
    bank = neighbours.bank_entry(features[:3], {"a": 1, "b": 1, "c": 1}, k=1)
    loaded = replace(loaded, feature_bank=bank, review={"ood_score": "knn"})
    logits, ood = scored_views(loaded, images, tta=True)
    assert ood.shape == (8, 5) and np.allclose(ood[0, :3], 0, atol=1e-3)  # bank members: distance 0
    assert (ood[0, 3:] > 1e-2).all()
    np.testing.assert_allclose(logits[:, :2], scored_views(replace(loaded, review=None), images[:2], tta=True)[0],
                               atol=1e-5)
    # probabilities only (cross-lab scoring, few-shot, field typing): the same logits, no score,
    # and no ScoredModel hook left on the head
    only_logits, no_ood = scored_views(loaded, images, tta=True, with_ood=False)
    np.testing.assert_allclose(only_logits, logits, atol=1e-5)
    assert np.isnan(no_ood).all()
    np.testing.assert_allclose(predict.logit_views(loaded, images), logits[:1], atol=1e-5)
    assert not model.get_submodule(neighbours.head_name(model))._forward_pre_hooks


def test_review_keeps_both_thresholds_and_falls_back_to_energy_without_a_bank():
    rng = np.random.default_rng(0)
    proba = rng.dirichlet(np.ones(3), 100)
    knn, energy = rng.uniform(0, 1, 100), rng.normal(-5, 1, 100)
    entry = review_entry(proba, proba.argmax(1), {"energy": energy, "knn": knn})
    assert entry["ood_score"] == "knn" and entry["ood_threshold"] == pytest.approx(np.quantile(knn, 0.99))
    assert entry["ood_thresholds"]["energy"] == pytest.approx(np.quantile(energy, 0.99))
    without = calibration_fields({"temperature": 1.0}, entry, None, True, knn_available=False)["review"]
    assert without["ood_score"] == "energy" and without["ood_threshold"] == entry["ood_thresholds"]["energy"]
    assert calibration_fields({"temperature": 1.0}, entry, None, True, knn_available=True)["review"] == entry
    assert review_entry(proba, proba.argmax(1), {"energy": energy})["ood_score"] == "energy"
