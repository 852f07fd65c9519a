"""crosslab.py: class restriction, per-cell counting, refusing a lab the run trained on, and
the cross_lab records' way into metrics.json; scored with a tiny untrained model on real LISC cells."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bloodcell_lib.core.fileio import atomic_torch_save
from bloodcell_lib.data.datasets import load_manifest
from bloodcell_lib.evaluation import crosslab
from bloodcell_lib.modeling.models import create_model, resolve_data_config
from bloodcell_lib.reporting import summary
from tests.conftest import real_data

PBC_CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
SIZE = 32


def make_checkpoint(path, config):
    torch.manual_seed(0)
    model = create_model("resnet18", len(PBC_CLASSES), pretrained=False)
    atomic_torch_save({
        "format": "bloodcell-checkpoint", "format_version": 1, "model": model.state_dict(), "epoch": 1,
        "config": {"model": "resnet18", "image_size": SIZE, "channels_last": False, "tta": False, **config},
        "class_names": PBC_CLASSES, "model_name": "resnet18",
        "data_config": dict(resolve_data_config("resnet18", SIZE), image_size=SIZE),
    }, path)
    return path


@pytest.fixture(scope="module")
def lisc_sample():
    """Two real LISC cells per class, as a target source of lab lisc."""
    table = load_manifest("folder", root=real_data("lisc", "LISC_crops")).table
    sample = table.groupby("label").head(2).reset_index(drop=True)
    return crosslab.TargetSource("lisc-sample", "lisc", "2 LISC cells per class",
                                 lambda crop, margin: crosslab._with_stain(sample, crop, margin),
                                 min_class_cells=0)  # a sample: every class has 2 cells


def test_restriction_argmaxes_only_over_the_target_classes():
    proba = np.full((2, len(PBC_CLASSES)), 0.01)
    proba[:, PBC_CLASSES.index("ig")] = 0.9  # the model's favourite is a class the target set lacks
    proba[0, PBC_CLASSES.index("monocyte")] = 0.05
    proba[1, PBC_CLASSES.index("neutrophil")] = 0.05
    kept, names = crosslab.restrict(proba, PBC_CLASSES, ["Monocyte", "NEUTROPHIL", "Lymphocyte"])
    assert names == ["Lymphocyte", "Monocyte", "NEUTROPHIL"]  # the target's spelling, the model's order
    np.testing.assert_allclose(kept.sum(axis=1), 1.0)
    assert [names[i] for i in kept.argmax(axis=1)] == ["Monocyte", "NEUTROPHIL"]
    score = crosslab.score_restricted(proba, PBC_CLASSES, ["Monocyte", "NEUTROPHIL"])
    assert score["accuracy"] == 1.0 and score["classes"] == ["Monocyte", "NEUTROPHIL"]
    with pytest.raises(ValueError, match="fewer than 2"):
        crosslab.restrict(proba, PBC_CLASSES, ["monocyte", "smudge"])


def test_copies_of_one_cell_count_once():
    eye = np.eye(2)
    # cell a: 4 copies all right; cell b: 1 copy of 3 right -> wrong once (mean probability)
    proba = np.stack([eye[0]] * 4 + [eye[1], eye[0] * 0.6 + eye[1] * 0.4, eye[0]])
    labels = ["x"] * 4 + ["y"] * 3
    groups = ["a"] * 4 + ["b"] * 3
    score = crosslab.score_restricted(proba, ["x", "y"], labels, groups)
    assert (score["unit"], score["n"], score["n_images"]) == ("cell", 2, 7)
    assert score["accuracy"] == 0.5  # per picture it would read 5/7
    low, high = score["interval"]["accuracy"]
    assert 0.0 <= low <= 0.5 <= high <= 1.0
    with pytest.raises(ValueError, match="different labels"):
        crosslab.per_cell(proba[:2], ["x", "y"], ["a", "a"])


def test_trained_labs_follow_data_extra_train_and_init_from():
    assert crosslab.trained_labs({"dataset": "pbc"}) == {"pbc"}
    assert crosslab.trained_labs({"dataset": "kaggle", "extra_train": "pbc"}) == {"bccd", "pbc"}
    assert crosslab.trained_labs({"dataset": "bccd", "init_from": "pbc"}) == {"bccd", "pbc"}  # experiments/pbc.yaml
    assert crosslab.trained_labs({"dataset": "multi", "sources": ["pbc", "bccd", "lisc"], "test_source": "lisc"}) \
        == {"pbc", "bccd"}
    with pytest.raises(ValueError, match="init_from"):
        crosslab.trained_labs({"dataset": "pbc", "init_from": "no-such-experiment"})
    # a leave-one-lab-out run's held-out lab is in its split (its test part), though never trained on
    assert crosslab.labs_in_run({"dataset": "multi", "sources": ["pbc", "bccd", "lisc"], "test_source": "kaggle"}) \
        == {"pbc", "bccd", "lisc"}
    assert crosslab.labs_in_run({"dataset": "pbc"}) == {"pbc"}


@pytest.mark.integration
def test_score_other_labs_on_real_cells_refuses_trained_labs(tmp_path, lisc_sample):
    run = tmp_path / "pbc-tiny"
    run.mkdir()
    make_checkpoint(run / "checkpoint_best.pt", {"dataset": "pbc", "crop": "stain", "crop_margin": 0.5})
    pbc_again = crosslab.TargetSource("pbc", "pbc", "never read", lambda crop, margin: pytest.fail("read PBC"))
    result = crosslab.score_other_labs(run, sources=[pbc_again, lisc_sample], num_workers=0)
    assert [s["source"] for s in result.skipped] == ["pbc"] and "trained on lab 'pbc'" in result.skipped[0]["reason"]
    (record,) = result.records
    assert (record["experiment"], record["test_source"], record["train_labs"]) == ("pbc-tiny", "lisc-sample", ["pbc"])
    assert record["n"] == 10 and sorted(record["per_class_recall"]) == sorted(
        ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"])
    assert 0.0 <= record["balanced_accuracy"] <= 1.0 and record["seconds"] >= 0

    lisc_run = tmp_path / "lisc-tiny"
    lisc_run.mkdir()
    make_checkpoint(lisc_run / "checkpoint_best.pt", {"dataset": "pbc", "init_from": "no-such-experiment"})
    refused = crosslab.score_other_labs(lisc_run, sources=[lisc_sample], num_workers=0)
    assert refused.records == [] and "cannot tell" in refused.skipped[0]["reason"]


def test_records_round_trip_into_metrics_json(tmp_path):
    score = crosslab.score_restricted(np.eye(3)[[0, 1, 2, 2]], ["a", "b", "c"], ["a", "b", "c", "b"])
    result = crosslab.CrossLabResult(
        records=[{"experiment": "lolo-lisc", "train_labs": ["bccd", "pbc"], "test_source": "lisc", **score,
                  "folds": None, "seconds": 1.5}],
        skipped=[{"source": "pbc", "reason": "trained on it"}])
    record = {"name": "lolo-lisc", "profile": "full", "provenance": {"config": {"test_source": "lisc"}},
              **crosslab.record_fields(result)}
    assert record["cross_lab_lisc_balanced_accuracy"] == pytest.approx(score["balanced_accuracy"])
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(summary.metrics_document([record])))
    document = json.loads(path.read_text())
    (row,) = document["cross_lab"]
    assert set(row) == set(crosslab.RECORD_KEYS)
    assert row["per_class_recall"] == {"a": 1.0, "b": 0.5, "c": 1.0} and row["n"] == 4
    (target,) = [t for t in crosslab.lab_target_rows(document["targets"]) if t["experiment"] == "lolo-lisc"]
    assert target["value"] == pytest.approx(5 / 6) and target["status"] == "NOT MET"
    frame = crosslab.matrix_frame(document["cross_lab"], "balanced_accuracy")
    assert list(frame.columns) == ["experiment", "train labs", "lisc"] and frame.loc[0, "train labs"] == "bccd, pbc"
