"""Adapting a model to a lab: BatchNorm re-estimation (modeling.adaptation, predict --adapt),
few-shot fine-tuning (training.adapt, the ``adapt`` command) and the few-shot study, which
must never score its own adaptation cells. Real LISC cells, a tiny randomly initialised model."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from test_predict import make_checkpoint

from bloodcell_lib.data.datasets import load_manifest
from bloodcell_lib.evaluation import few_shot, predict
from bloodcell_lib.modeling.loaded import LoadedModel, load_checkpoint
from bloodcell_lib.modeling.adaptation import adapt_batchnorm, batchnorm_layers
from bloodcell_lib.training.adapt import AdaptError, AdaptRecipe, draw_cells
from conftest import real_data

LAB_CLASSES = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]
# "platelet": a class of the model that the lab folder lacks, which must be kept.
MODEL_CLASSES = [*LAB_CLASSES, "platelet"]
QUICK = AdaptRecipe(epochs=1, batch_size=8, unfreeze_last=1)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A copy of 4 real LISC cells per class (the data root is read-only)."""
    source = real_data("lisc", "LISC_crops")
    folder = tmp_path_factory.mktemp("lab") / "lab"
    for label in LAB_CLASSES:
        (folder / label).mkdir(parents=True)
        for path in sorted((source / label).iterdir())[:4]:
            shutil.copy(path, folder / label / path.name)
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint_best.pt", classes=MODEL_CLASSES)


def lab_images(folder, loaded):
    from bloodcell_lib.evaluation.adapt_bn import load_folder_images

    images, paths, skipped = load_folder_images(folder, loaded)
    assert not skipped
    return images, paths


# --------------------------------------------------------------------------- BatchNorm adaptation

def test_batchnorm_adaptation_changes_running_stats_and_nothing_else(ckpt, lab):
    loaded = load_checkpoint(ckpt)
    model = loaded.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, _ = lab_images(lab, loaded)
    done = adapt_batchnorm(loaded, images, batch_size=7)
    assert done == {"n_images": 20, "n_layers": len(batchnorm_layers(model))}
    after = model.state_dict()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
    stats = [k for k in after if k.endswith(("running_mean", "running_var"))]
    assert stats and all(not torch.equal(after[k], before[k]) for k in stats)
    assert not model.training and all(layer.momentum == 0.1 for layer in batchnorm_layers(model))


def test_batchnorm_adaptation_is_a_cumulative_average(ckpt, lab):
    """momentum None: equal batches give the same statistics in any batch size or order."""
    images, _ = lab_images(lab, load_checkpoint(ckpt))
    results = []
    for order, batch in ((torch.arange(20), 10), (torch.arange(19, -1, -1), 5)):
        loaded = load_checkpoint(ckpt)
        model = loaded.model
        adapt_batchnorm(loaded, images[order], batch_size=batch)
        results.append(model.bn1.running_mean.clone())
    assert torch.allclose(results[0], results[1], atol=1e-5)


def test_batchnorm_adaptation_bad_input(ckpt):
    loaded = load_checkpoint(ckpt)
    with pytest.raises(ValueError, match="at least 2 images"):
        adapt_batchnorm(loaded, torch.zeros((1, 3, 32, 32), dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        adapt_batchnorm(loaded, torch.zeros((4, 3, 32, 32)))


def test_predict_adapt_states_what_it_did(tmp_path, ckpt, lab, capsys):
    out = tmp_path / "p.csv"
    assert predict.main(["--checkpoint", str(ckpt), str(lab), "--out", str(out)]) == 0
    plain = pd.read_csv(out)
    (tmp_path / "unlabelled").mkdir()
    for path in sorted(lab.rglob("*.png")):  # unlabelled_adapt.MIN_CELLS = 20
        shutil.copy(path, tmp_path / "unlabelled" / path.name)
    (tmp_path / "unlabelled" / "notes.txt").write_text("not an image\n")
    capsys.readouterr()
    assert predict.main(["--checkpoint", str(ckpt), str(lab), "--out", str(out), "--adapt",
                         str(tmp_path / "unlabelled")]) == 0
    text = capsys.readouterr().out
    assert "preprocessing: whole picture (no crop), resized to 32x32" in text
    assert f"adaptation (adabn) on 20 unlabelled cell(s) from {tmp_path / 'unlabelled'}" in text
    assert "BatchNorm statistics of 20 layer(s) re-estimated" in text
    assert "adaptation skipped" in text and "notes.txt" in text
    adapted = pd.read_csv(out)
    assert len(adapted) == len(plain) == 20
    assert not np.allclose(adapted["confidence"], plain["confidence"])
    assert predict.main(["--checkpoint", str(ckpt), str(lab), "--adapt", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


# --------------------------------------------------------------------------- the adapt command

def test_adapt_writes_a_checkpoint_that_predict_loads(tmp_path, ckpt, lab, capsys):
    folder = tmp_path / "lab"
    shutil.copytree(lab, folder)
    (folder / "monocyte" / "readme.txt").write_text("not a cell\n")
    out = tmp_path / "lab.pt"
    rc = few_shot.main(["--checkpoint", str(ckpt), "--folder", str(folder), "--out", str(out),
                        "--k", "3", "--epochs", "1", "--unfreeze-last", "1"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "readme.txt" in text and "no cells of platelet" in text
    loaded = load_checkpoint(out)
    model = loaded.model
    assert loaded.class_names == MODEL_CLASSES
    record = loaded.config["adapted_from"]
    assert record["k_per_class"] == 3 and record["n_cells"] == 15
    assert record["cells_per_class"] == {label: 3 for label in LAB_CLASSES}
    assert not any(path.endswith(".txt") for path in record["cells"])
    parent = torch.load(ckpt, weights_only=True)["model"]
    assert not torch.equal(model.state_dict()["fc.weight"], parent["fc.weight"])
    assert predict.predict_images(loaded, folder).predictions.shape[0] == 20


def test_adapt_refuses_a_wrong_k_and_names_an_empty_or_unknown_class_folder(tmp_path, ckpt, lab, capsys):
    base = ["--checkpoint", str(ckpt), "--out", str(tmp_path / "x.pt"), "--epochs", "1"]
    assert few_shot.main([*base, "--folder", str(lab), "--k", "0"]) == 2
    assert "--k must be an integer >= 1" in capsys.readouterr().err
    folder = tmp_path / "lab"
    shutil.copytree(lab, folder)
    shutil.rmtree(folder / "basophil")
    (folder / "basophil").mkdir()
    assert few_shot.main([*base, "--folder", str(folder), "--unfreeze-last", "1"]) == 0
    assert f"empty class folder {folder / 'basophil'}" in capsys.readouterr().out
    (folder / "blast").mkdir()
    shutil.copy(next(lab.rglob("*.png")), folder / "blast")
    assert few_shot.main([*base, "--folder", str(folder)]) == 2
    assert "blast are not classes of the checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists() or (tmp_path / "x.pt").stat().st_size > 0


# --------------------------------------------------------------------------- the few-shot study

def test_draw_cells_takes_whole_groups_and_nests():
    table = pd.DataFrame({"path": [f"f{i}" for i in range(12)], "label": ["a"] * 6 + ["b"] * 6,
                          "group": ["g0", "g0", "g1", "g2", "g3", "g4", "h0", "h1", "h2", "h3", "h4", "h5"]})
    small, large = draw_cells(table, 2, seed=3), draw_cells(table, 4, seed=3)
    assert set(small) <= set(large)
    for rows in (small, large):
        taken = set(table["group"].iloc[rows])
        assert set(table.index[table["group"].isin(taken)]) == set(rows)  # groups whole
    assert (table["label"].iloc[large] == "b").sum() == 4
    with pytest.raises(AdaptError, match="k"):
        draw_cells(table, -1, seed=0)


def test_few_shot_study_never_scores_its_adaptation_cells(ckpt, lab):
    table = load_manifest("folder", lab).table
    record = few_shot.few_shot_study(ckpt, table, k_values=(0, 1, 2), seed=0, draws=2, recipe=QUICK)
    frame = few_shot.few_shot_table(record)
    assert frame["k"].tolist() == [0, 0, 1, 2] and (frame["draws"] == 2).all()
    assert frame["adaptation"].tolist() == [few_shot.AS_TRAINED, few_shot.UNLABELLED_BN,
                                            few_shot.FINE_TUNED, few_shot.FINE_TUNED]
    assert frame["n_adapt"].tolist() == [0, 0, 5, 10] and (frame["n_scored"] == 10).all()
    assert frame[["accuracy", "balanced_accuracy", "macro_f1"]].apply(lambda c: c.between(0, 1)).all().all()
    assert len(record["per_draw"]) == 8 and {row["seed"] for row in record["per_draw"]} == {0, 1}
    fields = few_shot.few_shot_fields(record)
    assert fields["adapt_bn_balanced_accuracy"] == frame["balanced_accuracy"][1]
    assert fields["few_shot_k0_balanced_accuracy"] == frame["balanced_accuracy"][0]
    overlapping = np.arange(3)
    with pytest.raises(AssertionError, match="both adapted on and scored"):
        few_shot._check_never_scored(table, overlapping, np.arange(2, 20))
    with pytest.raises(AdaptError, match="nothing left to score"):
        few_shot.few_shot_study(ckpt, table, k_values=(0, 4), recipe=QUICK)


def test_preprocessing_summary_names_the_crop_and_the_colour_normalisation():
    from bloodcell_lib.evaluation.pictures import preprocessing_summary

    loaded = LoadedModel(None, class_names=["a"], image_size=128,
                         data_config={"crop": "nucleus", "crop_margin": 0.5,
                                      "color_norm": {"method": "reinhard", "n": 900}})
    text = preprocessing_summary(loaded)
    assert "around the nucleus, its lobes joined" in text and "margin 0.5" in text
    assert "Reinhard, reference of 900 training pictures" in text and "128x128" in text
    assert "no colour normalisation" in preprocessing_summary(LoadedModel(None, class_names=["a"], image_size=64,
                                                                          data_config={"crop": "cell"}))
