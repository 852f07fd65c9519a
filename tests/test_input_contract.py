"""The input contract (issue 25): whatever picture a lab hands over, a model sees the cell at the
framing and scale it trained on, and the review flags never vouch for a cell that is unlike the
training cells at the scale it is seen."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bloodcell_lib.core.fileio import atomic_torch_save
from bloodcell_lib.data.stain import WINDOW_CENTRE, WINDOW_FOUND, WINDOW_WHOLE, cell_box, nucleus_box, window_box
from bloodcell_lib.evaluation.pictures import frame_like_training
from bloodcell_lib.evaluation.predict import predict_images, unlabelled_review, with_review_columns
from bloodcell_lib.modeling.loaded import LoadedModel
from bloodcell_lib.modeling.models import create_model, resolve_data_config
from bloodcell_lib.modeling.review import NO_CELL, OFF_SCALE, review_flags, scale_entry, summary_line

NATIVE = "pbc-native/PBC_native_360x363"
CROPS = "pbc/PBC_dataset_normal_DIB"


def _pairs(per_class: int = 3) -> list[tuple[Path, Path]]:
    """(native export, its 200x200 prepared crop) of a few cells per class."""
    from conftest import real_data

    native, crops = real_data(NATIVE), real_data(CROPS)
    return [(f, crops / f.parent.name / f.name) for folder in sorted(native.iterdir())
            for f in sorted(folder.glob("*.jpg"))[:per_class]]


def _iou(a, b) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.mark.integration
def test_native_export_is_cropped_to_its_prepared_crop():
    """The window of the analyser's 360x363 export covers the region its 200x200 copy was cut
    from (the central 200x200), and the copy itself is taken whole."""
    overlaps = []
    for native, crop in _pairs():
        big, small = Image.open(native).convert("RGB"), Image.open(crop).convert("RGB")
        window = window_box(big, 200)
        assert window.box is not None and window.box[2] - window.box[0] == 200 == window.box[3] - window.box[1]
        assert window.note in (WINDOW_FOUND, WINDOW_CENTRE)
        assert window_box(small, 200).box is None and window_box(small, 200).note == WINDOW_WHOLE
        left, top = (big.width - 200) // 2, (big.height - 200) // 2
        overlaps.append(_iou(window.box, (left, top, left + 200, top + 200)))
    assert np.mean(np.array(overlaps) >= 0.7) >= 0.9, np.round(overlaps, 2)


@pytest.mark.integration
def test_twice_the_scale_is_cropped_to_the_same_cell():
    """At twice the scale the nucleus-centred window and the nucleus-sized square land on the
    same cell: their centres (and the square's extent) scale with the picture."""
    for native, _ in _pairs(per_class=2):
        img = Image.open(native).convert("RGB")
        double = img.resize((img.width * 2, img.height * 2), Image.Resampling.BICUBIC)
        one, two = nucleus_box(img, join_lobes=True), nucleus_box(double, join_lobes=True)
        assert (one is None) == (two is None)
        if one is None:
            continue
        centre_one = np.array([(one[0] + one[2]) / 2, (one[1] + one[3]) / 2])
        centre_two = np.array([(two[0] + two[2]) / 2, (two[1] + two[3]) / 2]) / 2
        assert np.abs(centre_one - centre_two).max() <= 8, (native.name, centre_one, centre_two)
        square_one, square_two = cell_box(img, 0.1, True), cell_box(double, 0.1, True)
        assert _iou(square_one, tuple(v / 2 for v in square_two)) >= 0.8, native.name


def _checkpoint(path: Path, review: dict | None = None, conformal: dict | None = None) -> Path:
    torch.manual_seed(0)
    classes = ["lymphocyte", "monocyte"]
    model = create_model("resnet18", len(classes), pretrained=False)
    data_config = dict(resolve_data_config("resnet18", 32), image_size=32, crop="window", crop_window=200)
    ckpt = {"format": "bloodcell-checkpoint", "format_version": 1, "model": model.state_dict(), "optimizer": None,
            "scheduler": None, "epoch": 1, "config": {"model": "resnet18", "image_size": 32}, "class_names": classes,
            "model_name": "resnet18", "data_config": data_config, "best_metric": 0.5,
            "rng_state": torch.get_rng_state(), "calibration": {"temperature": 1.0, "n": 10, "fitted_on": "val",
                                                                "ece_before": 0.1, "ece_after": 0.05}}
    if review is not None:
        ckpt["review"] = review
    if conformal is not None:
        ckpt["conformal"] = conformal
    atomic_torch_save(ckpt, path)
    return path


def _cell_picture(side: int, nucleus: int) -> Image.Image:
    """A pale field with one violet disc of diameter ``nucleus`` in the middle."""
    yy, xx = np.mgrid[:side, :side]
    pixels = np.full((side, side, 3), (225, 205, 205), dtype=np.uint8)
    pixels[(yy - side / 2) ** 2 + (xx - side / 2) ** 2 <= (nucleus / 2) ** 2] = (110, 40, 160)
    return Image.fromarray(pixels)


def _review(scale: dict | None) -> dict:
    entry = {"confidence_threshold": 0.0, "ood_threshold": float("inf"), "ood_score": "energy",
             "ood_thresholds": {"energy": float("inf")}, "target_error": 0.005}
    return {**entry, "scale": scale} if scale else entry


def test_scale_range_per_class_from_validation_cells():
    entry = scale_entry(np.array([40.0, 50, 60, np.nan, 100, 120]), np.array([0, 0, 0, 0, 1, 1]),
                        ["lymphocyte", "monocyte", "basophil"])
    low, high = entry["per_class"]["lymphocyte"]
    assert low < 40 and 60 < high < 100
    assert "basophil" not in entry["per_class"]  # no validation cell: no range, never a made-up one
    assert entry["n"] == 5


def test_a_picture_at_a_new_scale_is_flagged(tmp_path):
    """A nucleus far smaller or larger than any validation cell of the predicted class is
    flagged 'unlike_training_scale', whatever the model's confidence; one in range is not."""
    folder = tmp_path / "cells"
    folder.mkdir()
    for name, nucleus in (("in_range", 60), ("tiny", 28), ("huge", 230)):
        _cell_picture(360, nucleus).save(folder / f"{name}.png")
    scale = {"per_class": {"lymphocyte": [45.0, 80.0], "monocyte": [45.0, 80.0]}}
    ckpt = _checkpoint(tmp_path / "ck.pt", review=_review(scale))
    frame = predict_images(ckpt, folder).predictions
    frame.index = [Path(p).stem for p in frame["path"]]
    assert {"crop", "nucleus_px"} <= set(frame.columns)
    assert 50 <= frame.loc["in_range", "nucleus_px"] <= 70
    assert not frame.loc["in_range", "needs_review"]
    for name in ("tiny", "huge"):
        assert frame.loc[name, "needs_review"] and OFF_SCALE in frame.loc[name, "review_reason"].split("+")


def test_no_nucleus_is_flagged_and_said(tmp_path):
    Image.new("RGB", (360, 360), (225, 205, 205)).save(tmp_path / "empty.png")
    ckpt = _checkpoint(tmp_path / "ck.pt", review=_review(None))
    result = predict_images(ckpt, tmp_path / "empty.png")
    row = result.predictions.iloc[0]
    assert row["crop"] == WINDOW_CENTRE and row["needs_review"] and row["review_reason"] == NO_CELL
    assert "1 no cell found" in result.summary()


def test_the_summary_never_claims_set_coverage_outside_the_calibration_cells():
    loaded = LoadedModel(None, class_names=["a", "b"], data_config={}, image_size=32,
                         review=_review(None) | {"ood_threshold": 1.0}, conformal={"alpha": 0.05, "qhat": 0.5})
    proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    like = unlabelled_review(proba, np.array([0.1, 0.2, 0.3]), loaded)
    assert "for the 3 cells like the calibration cells" in summary_line(like)
    assert "does not apply" not in summary_line(like)
    some = unlabelled_review(proba, np.array([0.1, 5.0, 0.3]), loaded, {NO_CELL: np.array([False, False, True])})
    assert some["sets"]["n"] == 1 and some["sets"]["n_outside"] == 2
    assert "for the 1 cells like the calibration cells" in summary_line(some)
    assert "does not apply to the other 2" in summary_line(some)
    none = unlabelled_review(proba, np.array([5.0, 5.0, 5.0]), loaded)
    assert "coverage does not apply (no cell is like the calibration cells)" in summary_line(none)


def test_review_flags_join_every_reason():
    proba = np.array([[0.55, 0.45], [0.99, 0.01]])
    review = _review(None) | {"confidence_threshold": 0.9, "ood_threshold": 1.0}
    flagged, reasons = review_flags(proba, np.array([2.0, 0.0]), review,
                                    {NO_CELL: np.array([True, False]), OFF_SCALE: np.array([False, False])})
    assert flagged.tolist() == [True, False]
    assert reasons == ["low_confidence+unlike_training+no_cell_found", ""]


def test_frame_like_training_states_what_it_did():
    small, big = _cell_picture(200, 50), _cell_picture(360, 50)
    config = {"crop": "window", "crop_window": 200}
    assert frame_like_training(small, config).note == WINDOW_WHOLE
    framed = frame_like_training(big, config)
    assert framed.note == WINDOW_FOUND and framed.image.size == (200, 200) and 45 <= framed.nucleus_px <= 55
    assert frame_like_training(big, {"crop": "none"}).note is None


def test_with_review_columns_without_crop_column_keeps_working():
    import pandas as pd

    loaded = LoadedModel(None, class_names=["a", "b"], data_config={}, image_size=32,
                         review=_review({"per_class": {}}))
    frame = with_review_columns(pd.DataFrame({"path": ["x"]}), np.array([[0.6, 0.4]]), np.array([0.0]), loaded)
    assert not frame["needs_review"].iloc[0]
