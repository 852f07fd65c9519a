"""Adaptation on a lab's unlabelled cells beyond AdaBN (evaluation.unlabelled_adapt,
modeling.adaptation): every method runs and keeps the prediction's shape, takes no label
(class folders renamed change nothing), keeps the unadapted model with too few cells or when
its answers collapse; ``predict``/``count --adapt-method``; the held-out-lab rows.
Real LISC cells (4 per class), a tiny randomly initialised model at 32 px."""
from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_nuclei import field
from test_predict import make_checkpoint

from bloodcell_lib.data.datasets import load_manifest
from bloodcell_lib.evaluation import count, few_shot, predict, unlabelled_adapt
from bloodcell_lib.evaluation.adapt_bn import load_folder_images
from bloodcell_lib.evaluation.features import logits_features
from bloodcell_lib.evaluation.predict import predict_tensors
from bloodcell_lib.modeling.loaded import load_checkpoint
from bloodcell_lib.evaluation.unlabelled_adapt import (ADAPTED, METHODS, MIN_CELLS, UNADAPTED, adapt_to_folder_by,
                                                       adapt_unlabelled)
from bloodcell_lib.modeling import adaptation as ada
from conftest import real_data

CLASSES = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]


def copy_lab(folder, names):
    """4 real LISC cells per class into ``folder``, class c's cells under the folder ``names[c]``."""
    source = real_data("lisc", "LISC_crops")
    for label, name in zip(CLASSES, names):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for path in sorted((source / label).iterdir())[:4]:
            shutil.copy(path, folder / name / f"{label}_{path.name}")
    return folder


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return copy_lab(tmp_path_factory.mktemp("lab") / "lab", CLASSES)


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    """The same pictures with their class folders named wrongly (every cell mislabelled)."""
    return copy_lab(tmp_path_factory.mktemp("poisoned") / "lab", CLASSES[1:] + CLASSES[:1])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint_best.pt", classes=CLASSES)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_adapts_and_keeps_the_prediction_shape(ckpt, lab, method):
    loaded = load_checkpoint(ckpt)
    model = loaded.model
    images, _, _ = load_folder_images(lab, loaded)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    done = adapt_unlabelled(loaded, images, method, source=str(lab))
    assert done.kept == ADAPTED and done.n_cells == 20, done.summary()
    text = done.summary()
    assert text.startswith(f"adaptation ({method}) on 20 unlabelled cell(s) from {lab} in ") and " s: " in text
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.endswith("running_mean") for k in changed)
    head = {"fc.weight", "fc.bias"} & changed
    assert bool(head) == (method == "t3a")
    trained = {k for k in changed if k.endswith("weight") and "bn" not in k and not k.startswith("fc")}
    assert bool(trained) == (method == "shot")
    proba = predict_tensors(loaded, images)
    assert proba.shape == (20, len(CLASSES)) and np.allclose(proba.sum(1), 1, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_methods_take_no_labels(ckpt, lab, poisoned, method):
    """Class folders renamed (every cell under a wrong class): the adapted model is the same."""
    answers = []
    for folder in (lab, poisoned):
        loaded = load_checkpoint(ckpt)
        assert adapt_to_folder_by(loaded, folder, method).kept == ADAPTED
        answers.append(predict_tensors(loaded, load_folder_images(lab, loaded)[0]))
    assert np.array_equal(answers[0], answers[1])


def test_too_few_cells_keep_the_unadapted_model(ckpt, lab, tmp_path, capsys):
    loaded = load_checkpoint(ckpt)
    model = loaded.model
    images, _, _ = load_folder_images(lab, loaded)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    done = adapt_unlabelled(loaded, images[:MIN_CELLS - 1], "shot", source="few/")
    assert done.kept == UNADAPTED
    assert f"only {MIN_CELLS - 1} readable cell(s) in few/, at least {MIN_CELLS} needed" in done.summary()
    assert "UNADAPTED model's answers are used" in done.summary()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    few = tmp_path / "few"
    few.mkdir()
    for path in sorted(lab.rglob("*.png"))[:5]:
        shutil.copy(path, few / path.name)
    out = tmp_path / "p.csv"
    assert predict.main(["--checkpoint", str(ckpt), str(lab), "--out", str(out), "--adapt", str(few),
                         "--adapt-method", "t3a", "--engine", "torch"]) == 0
    assert "adaptation (t3a) not applied" in capsys.readouterr().out


def test_collapse_guard():
    spread = np.repeat(np.arange(5), 10)  # 5 classes, 20 % each
    assert ada.collapse_reason(spread, spread, 5) is None
    assert "top class took 92%" in ada.collapse_reason(spread, np.r_[np.zeros(45, int), np.arange(5)], 5)
    two = np.r_[np.zeros(25, int), np.ones(24, int), [2]]  # 50 % / 48 % / 2 %: two classes >= 5 %
    assert "2 class(es) had >= 5%" in ada.collapse_reason(spread, two, 5)
    collapsed_before = np.zeros(50, int)
    assert ada.collapse_reason(collapsed_before, np.ones(50, int), 5) is None  # no worse than it was


def test_collapse_guard_restores_the_unadapted_model(ckpt, lab, monkeypatch):
    """A constructed collapse: a 'method' that makes the head answer class 0 for every cell."""
    loaded = load_checkpoint(ckpt)
    model = loaded.model
    images, _, _ = load_folder_images(lab, loaded)
    _, features = logits_features(loaded, images)
    centred = features - features.mean(0)
    with torch.no_grad():  # unadapted answers spread: class c's weight points at cell 4c's centred features
        model.fc.weight.copy_(torch.nn.functional.normalize(centred[::4], dim=1))
        model.fc.bias.copy_(-model.fc.weight @ features.mean(0))
    before = predict_tensors(loaded, images).argmax(1)
    assert np.bincount(before, minlength=5).max() / len(before) < 0.6, before

    def collapse(loaded, images, before, features, batch_size):
        model.fc.bias.data[0] = 1e6
        return "collapsed on purpose", []

    monkeypatch.setitem(unlabelled_adapt._METHODS, "adabn", collapse)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    done = adapt_unlabelled(loaded, images, "adabn")
    assert done.kept == UNADAPTED and "WARNING: the adapted answers collapsed" in done.summary()
    assert "top class took 100%" in done.summary()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_count_adapts_on_the_cells_of_fields(tmp_path, ckpt, capsys):
    folder = tmp_path / "fields"
    folder.mkdir()
    for i in range(4):
        field([(80 + 150 * j, 120 + 200 * (j % 2), 30 + 3 * j + i) for j in range(4)] +
              [(100 + 200 * j, 420, 28 + 2 * j) for j in range(2)]).save(folder / f"f{i}.png")
    assert count.main(["--checkpoint", str(ckpt), str(folder), "--out", str(tmp_path / "o"), "--no-overlays",
                       "--engine", "torch", "--adapt", str(folder), "--adapt-method", "adabn-balanced"]) == 0
    printed = capsys.readouterr().out
    assert f"adaptation (adabn-balanced) on 24 unlabelled cell(s) from the fields under {folder}" in printed
    assert count.main(["--checkpoint", str(ckpt), str(folder), "--adapt", str(tmp_path / "nowhere")]) == 2


def test_held_out_lab_study_has_one_row_per_method(ckpt, lab):
    table = load_manifest("folder", lab).table
    record = few_shot.few_shot_study(ckpt, table, k_values=(0,), seed=0, draws=1)
    unlabelled = record["unlabelled"]
    assert unlabelled["class_mix"] == {c: 4 for c in CLASSES}
    assert unlabelled["class_share"]["neutrophil"] == pytest.approx(0.2)
    frame = few_shot.unlabelled_table(record)
    assert frame["method"].tolist() == ["plain", *METHODS] and (frame["n_cells"] == 20).all()
    assert frame["balanced_accuracy"].between(0, 1).all()
    assert [f"recall_{c}" for c in CLASSES] == [c for c in frame.columns if c.startswith("recall_")]
    plain = record["rows"][0]
    assert plain["adaptation"] == few_shot.AS_TRAINED and frame["balanced_accuracy"][0] == plain["balanced_accuracy"]
    fields = few_shot.few_shot_fields(record)
    assert fields["unlabelled_adabn_balanced_balanced_accuracy"] == frame["balanced_accuracy"][2]
    assert fields["unlabelled_adabn_balanced_accuracy"] == frame["balanced_accuracy"][1]


def test_shot_leaves_cells_unlike_training_out_of_the_pseudo_labels(ckpt, lab, monkeypatch):
    """A feature bank and k-NN review threshold in the checkpoint: cells scoring above it are
    left out of SHOT's pseudo-labels (the cross-entropy term), not out of the adaptation."""
    from bloodcell_lib.modeling.neighbours import bank_entry, knn_distance, normalise

    loaded = load_checkpoint(ckpt)
    images, _, _ = load_folder_images(lab, loaded)
    _, features = logits_features(loaded, images)
    bank = bank_entry(features[::2], {"lab": 10}, k=1)
    score = knn_distance(features, normalise(bank["features"].float()), 1)
    threshold = float(score.median())
    loaded = replace(loaded, feature_bank=bank, review={"ood_thresholds": {"knn": threshold}})
    masks = []
    real = ada.shot_im
    monkeypatch.setattr(ada, "shot_im", lambda *a, **kw: masks.append(kw["pseudo_mask"]) or real(*a, **kw))
    done = adapt_unlabelled(loaded, images, "shot")
    left_out = int((score > threshold).sum())
    assert 0 < left_out < 20 and int((~masks[0]).sum()) == left_out
    assert f"{left_out} cell(s) with a k-NN score above the review threshold" in done.summary()


def test_the_rule_for_the_default_method():
    labs = {"pbc": {"adabn": 0.6, "t3a": 0.7, "shot": 0.9, "adabn-balanced": 0.6},
            "lisc": {"adabn": 0.5, "t3a": 0.6, "shot": 0.45, "adabn-balanced": 0.5}}
    assert few_shot.default_method_by_rule(labs) == "t3a"  # shot's mean is higher but it loses on lisc
    labs["lisc"]["t3a"] = 0.4
    assert few_shot.default_method_by_rule(labs) == "adabn"  # adabn-balanced ties: adabn stays
    assert few_shot.default_method_by_rule({}) == "adabn"
