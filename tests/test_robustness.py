"""robustness.py: every change alters the picture (and keeps its size and mode unless it is a
rescaling), severities grow within a change, the table has its columns and a clean row, and
the native framing rows take only cells of the run's test split."""
from __future__ import annotations

import types

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from bloodcell_lib.core.fileio import atomic_torch_save
from bloodcell_lib.data.splits import save_split
from bloodcell_lib.evaluation import robustness
from bloodcell_lib.modeling.models import create_model, resolve_data_config

SIZE = 32
CLASSES = ["lymphocyte", "neutrophil"]


def cell_picture(width: int = 90, height: int = 80, seed: int = 0) -> Image.Image:
    """A pale field with a violet 'nucleus' and some texture: every change has something to act on."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.normal(215, 12, size=(height, width, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    ImageDraw.Draw(img).ellipse((25, 20, 60, 55), fill=(110, 60, 150))
    return img


@pytest.fixture(scope="module")
def changes():
    return robustness.corruptions()


def test_every_change_alters_the_picture_and_keeps_size_and_mode(changes):
    img = cell_picture()
    for change in changes:
        out = change.fn(img)
        assert out.mode == "RGB", change
        assert not np.array_equal(np.asarray(out.resize(img.size)), np.asarray(img)), change
        if change.name == "rescale":
            factor = float(change.severity_label.rstrip("x"))
            assert out.size == (round(img.width * factor), round(img.height * factor)), change
        elif change.severity_label == "90 deg":
            assert out.size == (img.height, img.width)  # a quarter turn swaps the sides
        else:
            assert out.size == img.size, change
    assert changes[0].fn(img) is not img and img.size == (90, 80)  # the original is never changed


def test_changes_are_deterministic(changes):
    img = cell_picture()
    for change in changes:
        assert np.array_equal(np.asarray(change.fn(img)), np.asarray(change.fn(img))), change
    noise = next(c for c in changes if c.name == "sensor noise")
    other = cell_picture(seed=1)  # seeded by the picture's own pixels: another picture, other noise
    assert not np.array_equal(np.asarray(noise.fn(other)) - np.asarray(other),
                              np.asarray(noise.fn(img)) - np.asarray(img))


def test_every_acquisition_change_is_in_the_table(changes):
    names = {c.name for c in changes}
    assert names == {"rescale", "JPEG quality", "defocus blur", "colour temperature", "gamma", "sensor noise",
                     "rotation"}
    assert {c.severity_label for c in changes if c.name == "rescale"} == {"0.6x", "0.8x", "1.25x", "1.6x"}
    assert {c.severity_label for c in changes if c.name == "JPEG quality"} == {"quality 30", "quality 60",
                                                                               "quality 95"}
    assert all(c.level in robustness.LEVELS for c in changes)
    for name in names:  # each change has a moderate severity (the target reads those)
        assert any(c.level == "moderate" for c in changes if c.name == name), name


def test_severities_are_ordered_within_each_change(changes):
    img = cell_picture()
    original = np.asarray(img, dtype=np.float64)
    for name in {c.name for c in changes}:
        rows = [c for c in changes if c.name == name]
        ranks = [robustness.LEVELS.index(c.level) for c in rows]
        assert ranks == sorted(ranks), name  # listed mild -> severe
        for low, high in zip(rows, rows[1:]):
            if robustness.LEVELS.index(low.level) < robustness.LEVELS.index(high.level):
                assert max(c.strength for c in rows if c.level == low.level) <= \
                       min(c.strength for c in rows if c.level == high.level), (low, high)
        if name in ("JPEG quality", "defocus blur", "sensor noise", "colour temperature"):
            distance = [np.abs(np.asarray(c.fn(img), dtype=np.float64) - original).mean() for c in rows]
            assert distance == sorted(distance), (name, distance)


def make_run(tmp_path, *, review: bool, boxes: bool = False):
    """A run folder with an untrained resnet18 checkpoint and a split.csv of synthetic pictures."""
    run = tmp_path / "run"
    (tmp_path / "pics").mkdir()
    run.mkdir()
    rows = []
    for i in range(12):
        path = tmp_path / "pics" / f"cell_{i}.png"
        cell_picture(seed=i).save(path)
        rows.append({"path": str(path), "label": CLASSES[i % 2], "split": ["train", "val", "test"][i % 3],
                     "group": f"g{i}", "source": "folder", "box": (10, 10, 70, 70) if boxes else None})
    save_split(pd.DataFrame(rows), run / "split.csv")
    torch.manual_seed(0)
    model = create_model("resnet18", len(CLASSES), pretrained=False)
    entry = {"review": {"confidence_threshold": 0.55, "ood_score": "energy", "ood_threshold": 1e9},
             "calibration": {"method": "temperature", "temperature": 1.0}} if review else {}
    atomic_torch_save({"format": "bloodcell-checkpoint", "format_version": 1, "model": model.state_dict(), "epoch": 1,
                       "config": {"model": "resnet18", "image_size": SIZE, "channels_last": False, "dataset": "folder"},
                       "class_names": CLASSES, "model_name": "resnet18",
                       "data_config": dict(resolve_data_config("resnet18", SIZE), image_size=SIZE), **entry},
                      run / "checkpoint_best.pt")
    return types.SimpleNamespace(run_dir=run, seed=0, name="tiny", dataset="folder", sources=[])


@pytest.mark.parametrize("review", [True, False])
def test_study_table_has_its_columns_and_a_clean_row(tmp_path, changes, review):
    cfg = make_run(tmp_path, review=review)
    picked = [c for c in changes if c.level == "moderate"][:3]
    result = robustness.robustness_study(cfg, per_class=10, changes=picked, threads=1)
    table = result.table()
    assert list(table.columns) == list(robustness.TABLE_COLUMNS)
    assert len(table) == 1 + len(picked) and result.n_cells == 4  # the 4 test rows of the 12
    assert table.loc[0, "change"] == "clean" and table.loc[0, "accuracy drop"] == 0.0
    assert (table["n"] == 4).all() and table["accuracy"].between(0, 1).all()
    drops = table["accuracy"].iloc[0] - table["accuracy"]
    assert np.allclose(table["accuracy drop"], drops)
    assert table["accepted share"].notna().all() == review and table["accepted share"].isna().all() != review
    record = robustness.record_fields(result)["robustness"]
    assert [r["change"] for r in record["rows"]] == table["change"].tolist()
    assert record["native_excluded"] is None and record["n_cells"] == 4
    moderate = [r["accuracy_drop"] for r in record["rows"] if r["level"] == "moderate"]
    assert record["max_moderate_drop"] == max(moderate)
    assert "4 test cells" in result.caption()


def test_annotated_boxes_are_the_original_of_a_model_that_does_not_crop(tmp_path):
    cfg = make_run(tmp_path, review=False, boxes=True)
    table = robustness.rows_of_split(cfg.run_dir / "split.csv", per_class=1, seed=0)
    cells = robustness.decode_cells(table, {"crop": "cell"})
    assert [img.size for img in cells.pictures] == [(60, 60)] * 2 and cells.crop == [False, False]
    for crop in ("nucleus", "stain", "window"):  # found again in the whole changed picture
        cells = robustness.decode_cells(table, {"crop": crop})
        assert [img.size for img in cells.pictures] == [(90, 80)] * 2 and cells.crop == [True, True]


def test_a_picture_without_a_cell_counts_and_goes_to_review(tmp_path):
    from bloodcell_lib.evaluation.pictures import CROP_FOUND, CROP_NOT_FOUND
    from bloodcell_lib.modeling.loaded import load_checkpoint

    cfg = make_run(tmp_path, review=True)
    loaded = load_checkpoint(cfg.run_dir / "checkpoint_best.pt")
    images = torch.zeros((4, 3, SIZE, SIZE), dtype=torch.uint8)
    labels = ["lymphocyte", "neutrophil", "lymphocyte", "basophil"]  # a class the model lacks is always wrong
    found = pd.DataFrame({"crop": [CROP_NOT_FOUND, CROP_FOUND, CROP_FOUND, CROP_FOUND], "nucleus_px": [np.nan] * 4})
    got = robustness.score_batch(loaded, images, labels, found)
    assert got["n"] == 4 and got["crop_missed"] == 1 and got["accepted_share"] <= 0.75
    assert robustness.score_batch(loaded, images, labels)["crop_missed"] is None  # a model that does not crop


def test_native_cells_only_from_the_test_split(tmp_path):
    native = tmp_path / "native"
    prepared = tmp_path / "pbc" / "PBC_dataset_normal_DIB"
    files = {"neutrophil": ["SNE_1.jpg", "SNE_2.jpg", "SNE_3.jpg", "SNE_4.jpg", "SNE_5.jpg"], "platelet": ["PLT_1.jpg"]}
    for folder, names in files.items():
        (native / folder).mkdir(parents=True)
        for name in names:
            (native / folder / name).write_bytes(b"")
    split = pd.DataFrame({
        "path": [str(prepared / "neutrophil" / n) for n in ("SNE_1.jpg", "SNE_2.jpg", "SNE_3.jpg", "SNE_5.jpg")]
        + [str(tmp_path / "lisc" / "neutrophil" / "SNE_4.jpg")],  # another source's file of the same name
        "label": ["neutrophil"] * 5, "split": ["test", "train", "val", "test", "test"],
        "source": ["pbc", "pbc", "pbc", "pbc", "lisc"], "group": list("abcde"), "box": [None] * 5})
    table, excluded = robustness.native_cells(split, native)
    assert sorted(table["native"].map(lambda p: p.rsplit("/", 1)[-1])) == ["SNE_1.jpg", "SNE_5.jpg"]
    assert table["path"].str.contains("PBC_dataset_normal_DIB").all() and (table["label"] == "neutrophil").all()
    assert excluded == {"in the run's training split": 1, "in the run's validation split": 1,
                        "not in the run's split (a capped or subset source)": 1,
                        "class platelet: not one of the run's classes": 1}
    capped, excluded = robustness.native_cells(split, native, per_class=1)
    assert len(capped) == 1 and excluded["over the cap of 1 test cells per class"] == 1


def test_native_rows_only_for_runs_with_pbc_cells():
    assert robustness.has_pbc_cells({"dataset": "pbc"})
    assert robustness.has_pbc_cells({"dataset": "multi", "sources": ["pbc", "lisc"]})
    assert not robustness.has_pbc_cells({"dataset": "multi", "sources": ["bccd", "lisc"]})
    assert not robustness.has_pbc_cells({"dataset": "kaggle"})
