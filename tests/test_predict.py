"""predict.py: checkpoint loading errors, any image mode, skipped files with reasons,
batched == per-image inference, TTA, and the command line."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from bloodcell_lib.evaluation import predict
from bloodcell_lib.core.fileio import atomic_torch_save
from bloodcell_lib.modeling.models import create_model, resolve_data_config
from bloodcell_lib.evaluation.predict import predict_images, predict_tensors, predict_views
from bloodcell_lib.modeling.checkpoint import CheckpointError
from bloodcell_lib.modeling.loaded import load_checkpoint

CLASSES = ["eosinophil", "lymphocyte", "neutrophil"]
SIZE = 32


def make_checkpoint(path, model_name="resnet18", classes=CLASSES, size=SIZE, **extra):
    torch.manual_seed(0)
    model = create_model(model_name, len(classes), pretrained=False)
    data_config = dict(resolve_data_config(model_name, size), image_size=size)
    ckpt = {"format": "bloodcell-checkpoint", "format_version": 1, "model": model.state_dict(),
            "optimizer": None, "scheduler": None, "epoch": 3,
            "config": {"model": model_name, "image_size": size, "channels_last": False, "tta": False},
            "class_names": list(classes), "model_name": model_name, "data_config": data_config,
            "best_metric": 0.5, "rng_state": torch.get_rng_state()}
    ckpt.update(extra)
    atomic_torch_save(ckpt, path)
    return path


def make_images(folder):
    """Good images of several PIL modes and two bad files; returns (good names, bad names)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "rgb.jpg", quality=90)
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((40, 48), 128, np.uint8)])).save(folder / "rgba.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png")
    Image.fromarray((rgb[..., 1].astype(np.uint16) * 257)).save(folder / "sixteen.png")
    (folder / "sub").mkdir(exist_ok=True)
    Image.fromarray(rgb[::-1]).save(folder / "sub" / "nested.bmp")
    good = ["gray.png", "palette.png", "rgb.jpg", "rgba.png", "sixteen.png", "sub/nested.bmp"]
    data = (folder / "rgb.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "notes.txt").write_text("not an image\n")
    return good, ["notes.txt", "truncated.jpg"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint_best.pt")


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_checkpoint(ckpt)


# --------------------------------------------------------------------------- checkpoint errors

def test_load_checkpoint_fields(loaded, ckpt):
    assert not loaded.model.training
    assert loaded.class_names == CLASSES and loaded.model_name == "resnet18"
    assert loaded.image_size == SIZE and loaded.epoch == 3 and loaded.path == str(ckpt)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_checkpoint(tmp_path / "nope.pt")
    assert "nope.pt" in str(info.value)


def test_text_file_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("hello, I am text\n")
    with pytest.raises(CheckpointError, match="notes.pt is not a bloodcell checkpoint: not a PyTorch file"):
        load_checkpoint(bad)


def test_truncated_checkpoint(tmp_path, ckpt):
    cut = tmp_path / "cut.pt"
    data = ckpt.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt is not a readable bloodcell checkpoint") as info:
        load_checkpoint(cut)
    assert info.value.__cause__ is not None  # torch's error chained, not shown as the message
    assert "\n" not in str(info.value)


def test_pickled_objects_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "bloodcell-checkpoint", "obj": object()}, evil)
    with pytest.raises(CheckpointError, match="Python objects that are not loaded"):
        load_checkpoint(evil)


def test_random_dict_is_not_a_checkpoint(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match="other.pt is not a bloodcell checkpoint"):
        load_checkpoint(other)
    bare = tmp_path / "state_dict.pt"
    torch.save(create_model("resnet18", 3, pretrained=False).state_dict(), bare)
    with pytest.raises(CheckpointError, match="not a bloodcell checkpoint"):
        load_checkpoint(bare)


def test_other_format_version(tmp_path):
    path = make_checkpoint(tmp_path / "v2.pt", format_version=2)
    with pytest.raises(CheckpointError, match="format_version 2"):
        load_checkpoint(path)


def test_weights_that_do_not_fit(tmp_path):
    path = make_checkpoint(tmp_path / "mismatch.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["class_names"] = ["a", "b"]  # head has 3 outputs
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="weights do not fit model 'resnet18' with 2 classes"):
        load_checkpoint(path)


# --------------------------------------------------------------------------- prediction

def test_predict_folder_modes_and_skips(tmp_path, loaded):
    good, bad = make_images(tmp_path / "imgs")
    result = predict_images(loaded, [tmp_path / "imgs"], batch_size=4)
    rel = [str(p).split("imgs/", 1)[1] for p in result.predictions["path"]]
    assert rel == good  # every good file, sorted, nested folder included
    assert list(result.predictions.columns) == (["path", "predicted", "confidence"] + [f"prob_{c}" for c in CLASSES]
                                                + ["ood_score"])  # no review columns: the checkpoint has no thresholds
    probs = result.predictions[[f"prob_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert set(result.predictions["predicted"]) <= set(CLASSES)
    np.testing.assert_allclose(result.predictions["confidence"], probs.max(1))
    skipped = dict(zip([p.rsplit("/", 1)[1] for p in result.skipped["path"]], result.skipped["reason"]))
    assert set(skipped) == set(bad)
    assert "truncated" in skipped["truncated.jpg"]
    assert "not an image" in skipped["notes.txt"]
    assert "classified 6" in result.summary() and "skipped 2" in result.summary()


def test_missing_path_and_empty_folder_reported(tmp_path, loaded):
    (tmp_path / "empty").mkdir()
    result = predict_images(loaded, [tmp_path / "missing.png", tmp_path / "empty"])
    assert result.predictions.empty
    assert sorted(result.skipped["reason"]) == ["folder holds no files", "no such file or folder"]


def test_batched_equals_per_image(tmp_path, loaded):
    make_images(tmp_path / "imgs")
    batched = predict_images(loaded, tmp_path / "imgs", batch_size=64)
    single = predict_images(loaded, tmp_path / "imgs", batch_size=1)
    cols = [f"prob_{c}" for c in CLASSES]
    assert list(batched.predictions["path"]) == list(single.predictions["path"])
    np.testing.assert_allclose(batched.predictions[cols].to_numpy(), single.predictions[cols].to_numpy(), atol=1e-5)


def test_predict_tensors_tta_and_checks(loaded):
    x = torch.randint(0, 256, (5, 3, SIZE, SIZE), dtype=torch.uint8)
    plain = predict_tensors(loaded, x, batch_size=2)
    tta = predict_tensors(loaded, x, batch_size=3, tta=True)
    assert plain.shape == tta.shape == (5, 3)
    np.testing.assert_allclose(tta.sum(1), 1, atol=1e-5)
    # TTA averages the 8 dihedral views by hand
    from bloodcell_lib.data.transforms import tta_views
    views = [predict_tensors(loaded, v.contiguous()) for v in tta_views(x)]
    np.testing.assert_allclose(tta, np.mean(views, axis=0), atol=1e-5)
    # a TTA prediction is invariant to rotating the input
    rotated = predict_tensors(loaded, torch.rot90(x, 1, dims=(-2, -1)).contiguous(), tta=True)
    np.testing.assert_allclose(tta, rotated, atol=1e-5)
    with pytest.raises(ValueError, match="expects 32x32"):
        predict_tensors(loaded, torch.zeros((1, 3, 16, 16), dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        predict_tensors(loaded, torch.zeros((1, 3, SIZE, SIZE)))
    assert predict_tensors(loaded, torch.zeros((0, 3, SIZE, SIZE), dtype=torch.uint8)).shape == (0, 3)


def test_predict_views_first_view_is_the_plain_prediction(loaded):
    x = torch.randint(0, 256, (5, 3, SIZE, SIZE), dtype=torch.uint8)
    views = predict_views(loaded, x, batch_size=2, tta=True)
    assert views.shape == (8, 5, 3)
    np.testing.assert_allclose(views[0], predict_tensors(loaded, x), atol=1e-6)
    np.testing.assert_allclose(views.mean(axis=0), predict_tensors(loaded, x, tta=True), atol=1e-6)
    assert not np.allclose(views[0], views[1], atol=1e-4)  # the views differ, so the test could fail
    assert predict_views(loaded, x).shape == (1, 5, 3)
    assert predict_views(loaded, x[:0], tta=True).shape == (8, 0, 3)


def test_efficientnet_lite0_channels_last(tmp_path):
    path = make_checkpoint(tmp_path / "lite.pt", model_name="efficientnet_lite0",
                           config={"image_size": SIZE, "channels_last": True})
    loaded = load_checkpoint(path)
    assert loaded.channels_last
    x = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8)
    p = predict_tensors(loaded, x)
    assert p.shape == (2, 3) and np.isfinite(p).all()


# --------------------------------------------------------------------------- command line

def test_cli_writes_csv_and_summary(tmp_path, ckpt, capsys):
    good, bad = make_images(tmp_path / "imgs")
    out = tmp_path / "out" / "preds.csv"
    rc = predict.main(["--checkpoint", str(ckpt), str(tmp_path / "imgs"), "--out", str(out), "--batch-size", "3"])
    assert rc == 0
    frame = pd.read_csv(out)
    assert len(frame) == len(good)
    skipped = pd.read_csv(tmp_path / "out" / "preds_skipped.csv")
    assert len(skipped) == len(bad)
    text = capsys.readouterr().out
    assert "classified 6" in text and "skipped 2" in text and "truncated.jpg" in text


def test_cli_via_main_module(tmp_path, ckpt):
    from bloodcell_lib.__main__ import main

    make_images(tmp_path / "imgs")
    out = tmp_path / "p.csv"
    assert main(["predict", "--checkpoint", str(ckpt), str(tmp_path / "imgs" / "rgb.jpg"), "--out", str(out), "--tta"]) == 0
    assert len(pd.read_csv(out)) == 1


def test_cli_errors(tmp_path, ckpt, capsys):
    make_images(tmp_path / "imgs")
    bad = tmp_path / "bad.pt"
    bad.write_text("x")
    assert predict.main(["--checkpoint", str(bad), str(tmp_path / "imgs")]) == 2
    assert "bad.pt" in capsys.readouterr().err
    assert predict.main(["--checkpoint", str(ckpt), str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert predict.main([str(tmp_path / "imgs")]) == 2  # --checkpoint missing
    assert predict.main(["--checkpoint", str(ckpt), str(tmp_path / "imgs"), "--batch-size", "0"]) == 2
    assert predict.main(["--help"]) == 0
    # nothing classifiable: exit 1, and the reasons are said
    only_text = tmp_path / "texts"
    only_text.mkdir()
    (only_text / "a.txt").write_text("hi")
    assert predict.main(["--checkpoint", str(ckpt), str(only_text), "--out", str(tmp_path / "none.csv")]) == 1
    assert "no image could be classified" in capsys.readouterr().err


@pytest.mark.parametrize("crop", ["stain", "cell"])
def test_crop_models_get_the_stain_crop_at_prediction_and_say_so(tmp_path, crop, capsys):
    """A crop: cell model (trained on annotated WBC boxes) used to see whole fields of new
    pictures silently; now it gets the cell box estimated around the largest nucleus (as
    ``count`` crops), a stain model its stain crop, and the CSV/summary say whether a nucleus
    was found."""
    from test_stain import smear

    from bloodcell_lib.data.nuclei import crop_box, find_nuclei
    from bloodcell_lib.data.stain import cell_box
    from bloodcell_lib.data.transforms import pil_to_uint8

    image = smear((200, 100, 240, 150))
    image.save(tmp_path / "cell.png")
    smear(None).save(tmp_path / "empty.png")
    path = make_checkpoint(tmp_path / f"{crop}.pt")
    ckpt = torch.load(path, weights_only=False)
    ckpt["data_config"].update(crop=crop, crop_margin=0.5)
    atomic_torch_save(ckpt, path)
    loaded = load_checkpoint(path)
    result = predict_images(loaded, [tmp_path / "cell.png", tmp_path / "empty.png"])
    got = result.predictions.set_index(result.predictions["path"].map(lambda p: Path(p).name))
    box = (crop_box(find_nuclei(image)[0], {"crop": "cell", "crop_margin": 0.5}, image.size) if crop == "cell"
           else cell_box(image, 0.5))
    cropped = pil_to_uint8(image.crop(box), SIZE)
    whole = pil_to_uint8(image, SIZE)
    expected = predict_tensors(loaded, cropped[None])[0]
    assert np.allclose(got.filter(like="prob_").loc["cell.png"].to_numpy(), expected, atol=1e-5)
    assert not np.allclose(expected, predict_tensors(loaded, whole[None])[0], atol=1e-3)
    assert got["crop"].to_dict() == {"cell.png": "stain (found)", "empty.png": "none: no nucleus found"}
    summary = result.summary()
    assert "stain (found) 1" in summary and "none: no nucleus found 1" in summary
    assert ("annotated WBC boxes" in summary) == (crop == "cell")
    out = tmp_path / "p.csv"
    assert predict.main(["--checkpoint", str(path), str(tmp_path / "cell.png"), "--out", str(out)]) == 0
    assert pd.read_csv(out)["crop"].tolist() == ["stain (found)"] and "crop: the model" in capsys.readouterr().out



# --------------------------------------------------------------------------- calibration and review flags

def test_calibrated_checkpoint_scales_logits_and_flags(tmp_path, loaded, capsys):
    from bloodcell_lib.modeling.calibration import softmax

    make_images(tmp_path / "imgs")
    x = torch.randint(0, 255, (4, 3, SIZE, SIZE), dtype=torch.uint8)
    logits = predict.logit_views(loaded, x)[0]
    calibration = {"method": "temperature", "temperature": 0.5, "fitted_on": "val", "n": 10,
                   "ece_before": 0.1, "ece_after": 0.01}
    review = {"confidence_threshold": 1.01, "ood_threshold": 1e9}  # every cell below the threshold
    conformal = {"method": "lac", "alpha": 0.1, "fitted_on": "val", "n": 10, "qhat": 1.0}  # every class
    path = make_checkpoint(tmp_path / "calibrated.pt", calibration=calibration, review=review, conformal=conformal)
    cal_loaded = load_checkpoint(path)
    np.testing.assert_allclose(predict_tensors(cal_loaded, x), softmax(logits, 0.5), atol=1e-5)
    raw_loaded = load_checkpoint(path, calibrated=False)
    np.testing.assert_allclose(predict_tensors(raw_loaded, x), softmax(logits), atol=1e-5)
    assert raw_loaded.review is None and "uncalibrated" in predict.calibration_note(raw_loaded)
    assert raw_loaded.conformal is None  # the sets' threshold assumes calibrated probabilities

    result = predict_images(cal_loaded, [tmp_path / "imgs"])
    assert result.predictions["needs_review"].all()
    assert set(result.predictions["review_reason"]) == {"low_confidence"}
    assert "6 cells: 0 accepted, 6 to review (6 low confidence, 0 unlike training)" in result.summary()
    n_classes = len(cal_loaded.class_names)
    assert (result.predictions["prediction_set"].str.count(r" \| ") == n_classes - 1).all()
    assert (f"90% prediction sets for the 6 cells like the calibration cells: 0 of one class, "
            f"mean size {n_classes:.2f}") in result.summary()
    assert "calibrated: temperature 0.500" in result.summary()
    out = tmp_path / "p.csv"
    assert predict.main(["--checkpoint", str(path), str(tmp_path / "imgs"), "--out", str(out), "--no-calibration"]) == 0
    frame = pd.read_csv(out)
    assert "needs_review" not in frame and "prediction_set" not in frame and "ood_score" in frame
    assert "raw softmax probabilities (--no-calibration)" in capsys.readouterr().out


def test_uncalibrated_checkpoint_says_so(loaded):
    assert predict.calibration_note(loaded).startswith("uncalibrated: this checkpoint holds no calibration")
    assert loaded.temperature == 1.0


@pytest.mark.integration
@pytest.mark.slow
def test_mixed_folder_flags_the_strangers(tmp_path):
    """A small PBC model (calibrated on its val part by fit) classifies a folder of PBC test
    cells, LISC cells and two non-cell pictures: the non-cells are always flagged, another
    lab's cells at least as often as the model's own lab's, and they lie farther from the
    training cells (the k-NN score). A model this small may flag nearly every cell for low
    confidence (its calibration rests on 86 cells), so the ordering of the flag rates alone
    depends on the machine's arithmetic; the score's ordering does not."""
    import shutil

    from conftest import real_data
    from bloodcell_lib.data.splits import load_split
    from bloodcell_lib.training import train
    from bloodcell_lib.training.config import make_config

    real_data("pbc")
    lisc = real_data("lisc", "LISC_crops")
    cfg = make_config(dict(name="mini", dataset="pbc", output_dir=str(tmp_path / "runs"), model="efficientnet_lite0",
                           pretrained=True, freeze="backbone", unfreeze_last=2, image_size=64, subset_per_class=40,
                           epochs=2, batch_size=32, lr=3e-3, val_fraction=0.25, test_fraction=0.2, seed=0, threads=2))
    run = train.fit(cfg, progress=False)
    split = load_split(run.run_dir / "split.csv")
    folder = tmp_path / "mixed"
    for sub, files in (("pbc", split.loc[split["split"] == "test", "path"].head(24)),
                       ("lisc", sorted(lisc.rglob("*.png"))[::9][:24])):
        (folder / sub).mkdir(parents=True)
        for f in files:
            shutil.copy(f, folder / sub / Path(f).name)
    (folder / "other").mkdir()
    Image.new("RGB", (120, 120), (30, 160, 60)).save(folder / "other" / "plain_green.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 120, 3), dtype=np.uint8)).save(
        folder / "other" / "noise.png")
    result = predict_images(run.checkpoint_best, [folder])
    frame = result.predictions.assign(source=[Path(p).parent.name for p in result.predictions["path"]])
    flagged = frame.groupby("source")["needs_review"].mean()
    assert flagged["other"] == 1.0
    assert flagged["lisc"] >= flagged["pbc"]
    distance = frame.groupby("source")["ood_score"].median()
    assert distance["lisc"] > distance["pbc"], distance.to_dict()
    assert distance["other"] > distance["pbc"], distance.to_dict()
    assert "cells:" in result.summary() and "to review" in result.summary()
