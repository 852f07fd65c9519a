"""Manifest loaders on tiny trees made in tmp_path, then on the real data when present."""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bloodcell_lib.training.config import TrainConfig
from bloodcell_lib.data.catalog import COLUMNS
from bloodcell_lib.data.datasets import load_manifest
from bloodcell_lib.data.selection import load_manifest_for
from bloodcell_lib.core.paths import DataNotFoundError

from conftest import real_data


def write_image(path: Path, color=(200, 0, 0), size=(8, 8), fmt="PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, fmt)
    return path


def make_class_tree(root: Path, counts: dict[str, int], start: int = 0) -> Path:
    """Folder-per-class tree with ``counts[label]`` byte-distinct tiny PNGs per class."""
    number = start
    for label, count in counts.items():
        for index in range(count):
            write_image(root / label / f"{label}_{index}.png", color=(number % 256, number // 256, 99))
            number += 1
    return root


def truncated_jpeg(path: Path) -> Path:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[:-300])
    return path


def dropped_kinds(manifest) -> dict[str, int]:
    return manifest.dropped["kind"].value_counts().to_dict()


# --------------------------------------------------------------------------- folder / pbc
def test_folder_table_contract(tmp_path):
    make_class_tree(tmp_path, {"b": 2, "a": 3})
    manifest = load_manifest("folder", tmp_path)
    table = manifest.table
    assert list(table.columns) == COLUMNS
    assert manifest.classes == ["a", "b"]
    assert table["label"].tolist() == ["a", "a", "a", "b", "b"]
    assert table["path"].tolist() == sorted(table["path"]) and all(Path(p).is_absolute() for p in table["path"])
    assert set(table["split"]) == {""} and set(table["source"]) == {"folder"} and table["box"].isna().all()
    assert table["group"].nunique() == 5
    assert manifest.dropped.empty and manifest.notes == [] and manifest.root == tmp_path.resolve()


def test_folder_needs_root():
    with pytest.raises(ValueError, match="needs the folder"):
        load_manifest("folder")


def test_unreadable_files_are_dropped_with_reason(tmp_path):
    make_class_tree(tmp_path, {"a": 2})
    (tmp_path / "a" / "notes.jpg").write_text("not a picture")
    (tmp_path / "a" / ".DS_0001.jpg").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    truncated_jpeg(tmp_path / "a" / "cut.jpg")
    manifest = load_manifest("folder", tmp_path)
    assert len(manifest.table) == 2
    dropped = manifest.dropped.set_index("item")
    assert set(dropped["kind"]) == {"unreadable"}
    assert "not an image" in dropped.loc[str(tmp_path / "a" / "notes.jpg"), "reason"]
    assert ".DS_Store" in dropped.loc[str(tmp_path / "a" / ".DS_0001.jpg"), "reason"]
    assert "truncated" in dropped.loc[str(tmp_path / "a" / "cut.jpg"), "reason"]


def test_empty_class_folder_is_noted(tmp_path):
    make_class_tree(tmp_path, {"a": 2})
    (tmp_path / "empty").mkdir()
    manifest = load_manifest("folder", tmp_path)
    assert manifest.classes == ["a"]
    assert any("empty class folder" in note and "empty" in note for note in manifest.notes)


def test_loose_files_and_hidden_folders_are_noted(tmp_path):
    make_class_tree(tmp_path, {"a": 1})
    (tmp_path / "README.txt").write_text("hi")
    write_image(tmp_path / ".cache" / "x.png")
    notes = " ".join(load_manifest("folder", tmp_path).notes)
    assert "README.txt" in notes and ".cache" in notes


def test_duplicates_share_a_group_and_cross_class_copies_are_dropped(tmp_path):
    make_class_tree(tmp_path, {"eos": 3, "neu": 3})
    same_class = (tmp_path / "eos" / "eos_0.png").read_bytes()
    (tmp_path / "eos" / "eos_copy.png").write_bytes(same_class)
    cross = (tmp_path / "eos" / "eos_1.png").read_bytes()
    (tmp_path / "neu" / "neu_copy.png").write_bytes(cross)
    manifest = load_manifest("folder", tmp_path)
    table = manifest.table.set_index("path")
    groups = table["group"]
    assert groups[str(tmp_path / "eos" / "eos_0.png")] == groups[str(tmp_path / "eos" / "eos_copy.png")]
    ambiguous = manifest.dropped[manifest.dropped["kind"] == "ambiguous-duplicate"]
    assert sorted(ambiguous["item"]) == [str(tmp_path / "eos" / "eos_1.png"), str(tmp_path / "neu" / "neu_copy.png")]
    assert all("eos_1.png" in reason and "neu_copy.png" in reason for reason in ambiguous["reason"])
    assert str(tmp_path / "eos" / "eos_1.png") not in table.index
    assert len(table) == 6
    assert sorted(entry["cross_class"] for entry in manifest.duplicates) == [False, True]


def test_edited_file_is_hashed_again(tmp_path):
    make_class_tree(tmp_path, {"a": 2})
    assert not load_manifest("folder", tmp_path).duplicates
    time.sleep(0.01)
    (tmp_path / "a" / "a_1.png").write_bytes((tmp_path / "a" / "a_0.png").read_bytes())
    assert len(load_manifest("folder", tmp_path).duplicates) == 1


def test_crop_cell_only_for_bccd(tmp_path):
    make_class_tree(tmp_path, {"a": 1})
    with pytest.raises(ValueError, match="only the bccd"):
        load_manifest("folder", tmp_path, crop="cell")


def test_crop_stain_crops_around_the_nucleus_and_notes_pictures_without_one(tmp_path):
    from test_stain import smear

    smear((200, 100, 240, 150)).save((tmp_path / "a").mkdir() or tmp_path / "a" / "cell.png")
    smear(None).save((tmp_path / "b").mkdir() or tmp_path / "b" / "empty.png")
    manifest = load_manifest("folder", tmp_path, crop="stain", margin=0.5)
    boxes = dict(zip(manifest.table["label"], manifest.table["box"]))
    left, top, right, bottom = boxes["a"]
    assert right - left == pytest.approx(bottom - top) and left < 200 and right > 240
    assert boxes["b"] is None
    assert any("crop 'stain'" in note and "empty.png" in note for note in manifest.notes)


# --------------------------------------------------------------------------- kaggle layouts
def make_kaggle(folder: Path) -> Path:
    make_class_tree(folder / "images" / "TRAIN", {"EOSINOPHIL": 3, "NEUTROPHIL": 2})
    make_class_tree(folder / "images" / "TEST", {"EOSINOPHIL": 1, "NEUTROPHIL": 1}, start=10)
    make_class_tree(folder / "images" / "TEST_SIMPLE", {"EOSINOPHIL": 1}, start=20)
    return folder


@pytest.mark.parametrize("layout", ["blood-cells/dataset2-master", "dataset2-master/dataset2-master",
                                    "dataset2-master", "."])
def test_kaggle_layouts(tmp_path, layout):
    folder = make_kaggle(tmp_path / layout)
    manifest = load_manifest("kaggle", tmp_path)
    assert manifest.root == folder.resolve()
    assert manifest.table["split"].value_counts().to_dict() == {"train": 5, "test": 2, "test_simple": 1}
    assert manifest.classes == ["EOSINOPHIL", "NEUTROPHIL"]


def test_kaggle_missing_split_is_noted(tmp_path):
    make_class_tree(tmp_path / "images" / "TRAIN", {"EOSINOPHIL": 1})
    notes = " ".join(load_manifest("kaggle", tmp_path).notes)
    assert "TEST" in notes and "TEST_SIMPLE" in notes


def test_explicit_root_without_the_data_set_does_not_fall_back(tmp_path):
    (tmp_path / "other").mkdir()
    with pytest.raises(DataNotFoundError, match="no 'kaggle' data set under"):
        load_manifest("kaggle", tmp_path / "other")
    with pytest.raises(DataNotFoundError, match="does not exist"):
        load_manifest("pbc", tmp_path / "absent")


def test_pbc_layouts(tmp_path):
    make_class_tree(tmp_path / "pbc" / "PBC_dataset_normal_DIB", {"basophil": 1, "ig": 1})
    assert load_manifest("pbc", tmp_path).classes == ["basophil", "ig"]
    assert len(load_manifest("pbc", tmp_path / "pbc").table) == 2
    inside = load_manifest("pbc", tmp_path / "pbc" / "PBC_dataset_normal_DIB")  # the set's folder itself
    assert inside.root == (tmp_path / "pbc" / "PBC_dataset_normal_DIB").resolve() and len(inside.table) == 2


# --------------------------------------------------------------------------- bccd
VOC_OBJECT = ("<object><name>{name}</name><bndbox><xmin>{0}</xmin><ymin>{1}</ymin><xmax>{2}</xmax>"
              "<ymax>{3}</ymax></bndbox></object>")


def write_voc(path: Path, objects: list[tuple[str, tuple[int, int, int, int]]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(VOC_OBJECT.format(*box, name=name) for name, box in objects)
    path.write_text(f"<annotation><size><width>100</width><height>80</height></size>{body}</annotation>")


@pytest.fixture
def bccd(tmp_path) -> Path:
    """Tiny BCCD: labels.csv rows 0..5 covering single, multi, blank, missing file, no WBC box."""
    folder = tmp_path / "dataset-master" / "dataset-master"  # Kaggle's doubled layout
    for number in (0, 1, 2, 3, 5):
        write_image(folder / "JPEGImages" / f"BloodImage_{number:05d}.jpg", (number * 40, 0, 0), (100, 80), "JPEG")
    (folder / "labels.csv").write_text(
        ",Image,Category\r\n,0,NEUTROPHIL\r\n,1,\"NEUTROPHIL, EOSINOPHIL\"\r\n,2,\r\n,3,LYMPHOCYTE\r\n"
        ",4,MONOCYTE\r\n,5,BASOPHIL\r\n")
    write_voc(folder / "Annotations" / "BloodImage_00000.xml", [("WBC", (20, 10, 60, 50)), ("RBC", (0, 0, 5, 5))])
    write_voc(folder / "Annotations" / "BloodImage_00003.xml", [("WBC", (0, 0, 20, 20)), ("WBC", (70, 50, 98, 78))])
    write_voc(folder / "Annotations" / "BloodImage_00005.xml", [("RBC", (1, 1, 9, 9))])
    return tmp_path


def test_bccd_single_label_rows_only(bccd):
    manifest = load_manifest("bccd", bccd)
    assert manifest.table["label"].tolist() == ["NEUTROPHIL", "LYMPHOCYTE", "BASOPHIL"]
    assert dropped_kinds(manifest) == {"multi-label": 1, "no-label": 1, "missing": 1}
    reasons = manifest.dropped.set_index("kind")["reason"]
    assert "line 3" in reasons["multi-label"] and "NEUTROPHIL, EOSINOPHIL" in reasons["multi-label"]
    assert "line 6" in reasons["missing"]
    assert manifest.table["box"].isna().all() and set(manifest.table["split"]) == {""}


def test_bccd_cell_crops(bccd):
    manifest = load_manifest("bccd", bccd, crop="cell", margin=0.25)
    table = manifest.table
    boxes = dict(zip(zip(table["label"], table.groupby("path").cumcount()), table["box"]))
    assert boxes[("NEUTROPHIL", 0)] == (10, 0, 70, 60)  # 20-10, 10-10, 60+10, 50+10; ymin clamped to 0
    assert boxes[("LYMPHOCYTE", 0)] == (0, 0, 25, 25)
    assert boxes[("LYMPHOCYTE", 1)] == (63, 43, 100, 80)  # clamped to the 100x80 image
    assert boxes[("BASOPHIL", 0)] is None
    lymphocytes = table[table["label"] == "LYMPHOCYTE"]
    assert len(lymphocytes) == 2 and lymphocytes["group"].nunique() == 1
    assert any("BloodImage_00005.jpg" in note and "no WBC box" in note for note in manifest.notes)


def test_bccd_without_labels_file(bccd):
    (bccd / "dataset-master" / "dataset-master" / "labels.csv").unlink()
    with pytest.raises(DataNotFoundError, match="labels.csv"):
        load_manifest("bccd", bccd)


# --------------------------------------------------------------------------- csv
def test_csv_common_column_names_and_relative_paths(tmp_path):
    make_class_tree(tmp_path / "imgs", {"a": 2, "b": 1})
    csv = tmp_path / "list.csv"
    csv.write_text("Filename,Class\nimgs/a/a_0.png,a\nimgs/a/a_1.png,a\n" + f"{tmp_path / 'imgs/b/b_0.png'},b\n")
    manifest = load_manifest("csv", csv_path=csv)
    assert manifest.table["label"].tolist() == ["a", "a", "b"]
    assert manifest.table["path"].iloc[0] == str(tmp_path / "imgs" / "a" / "a_0.png")
    assert manifest.root == tmp_path.resolve()


def test_csv_missing_columns_names_file_and_columns(tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("picture,kind\nx.png,a\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*columns found: \['picture', 'kind'\]"):
        load_manifest("csv", csv_path=csv)


def test_csv_bad_rows_are_dropped_with_reasons(tmp_path):
    make_class_tree(tmp_path, {"a": 2, "b": 1})
    csv = tmp_path / "list.csv"
    csv.write_text("path,label\na/a_0.png,a\na/gone.png,a\na/a_1.png,\n,b\nb/b_0.png,b,extra\n"
                   "a/a_0.png,a\nb/b_0.png,b\nb/b_0.png,a\n")
    manifest = load_manifest("csv", csv_path=csv)
    assert manifest.table["path"].tolist() == [str(tmp_path / "a" / "a_0.png")]
    assert dropped_kinds(manifest) == {"missing": 2, "no-label": 1, "malformed": 1, "repeated": 1,
                                       "ambiguous-duplicate": 2}
    reasons = manifest.dropped.groupby("kind")["reason"].apply(lambda rows: sorted(r.split(": ")[-1] for r in rows))
    assert reasons["missing"] == ["file not found", "no path"]
    assert reasons["malformed"] == ["malformed CSV row (3 fields, header has 2)"]
    ambiguous = manifest.dropped[manifest.dropped["kind"] == "ambiguous-duplicate"]
    assert set(ambiguous["item"]) == {str(tmp_path / "b" / "b_0.png")}  # listed as both b and a


# --------------------------------------------------------------------------- config-driven
def test_load_manifest_for_drops_classes_and_subsets(tmp_path):
    make_class_tree(tmp_path, {"a": 10, "b": 10, "c": 4})
    cfg = TrainConfig(dataset="folder", data_dir=str(tmp_path), drop_classes=["c"], subset_per_class=3, seed=7)
    manifest = load_manifest_for(cfg)
    assert manifest.classes == ["a", "b"]
    assert manifest.table["label"].value_counts().to_dict() == {"a": 3, "b": 3}
    assert manifest.table["path"].tolist() == sorted(manifest.table["path"])
    dropped = manifest.dropped[manifest.dropped["kind"] == "drop_classes"]
    assert dropped["item"].tolist() == ["class c"] and "4 image(s)" in dropped["reason"].iloc[0]
    assert load_manifest_for(cfg).table.equals(manifest.table)  # seeded
    other_seeds = {tuple(load_manifest_for(TrainConfig(dataset="folder", data_dir=str(tmp_path), subset_per_class=3,
                                                       seed=seed)).table["path"]) for seed in range(5)}
    assert len(other_seeds) > 1


def test_extra_training_images_of_shared_classes_join_the_training_split(tmp_path, monkeypatch):
    make_kaggle(tmp_path / "kaggle")
    make_class_tree(tmp_path / "data" / "pbc" / "PBC_dataset_normal_DIB",
                    {"eosinophil": 3, "neutrophil": 1, "platelet": 2}, start=50)
    monkeypatch.setenv("BLOODCELL_DATA", str(tmp_path / "data"))
    cfg = TrainConfig(dataset="kaggle", data_dir=str(tmp_path / "kaggle"), extra_train="pbc",
                      extra_train_per_class=2)
    manifest = load_manifest_for(cfg)
    own = load_manifest("kaggle", tmp_path / "kaggle")
    assert manifest.table.iloc[:len(own.table)].equals(own.table)  # the set itself unchanged
    extra = manifest.table.iloc[len(own.table):]
    assert extra["source"].eq("pbc").all() and extra["split"].eq("train").all()
    assert extra["label"].value_counts().to_dict() == {"EOSINOPHIL": 2, "NEUTROPHIL": 1}  # capped, relabelled
    assert manifest.classes == own.classes
    note = next(note for note in manifest.notes if note.startswith("extra_train:"))
    assert "3 training-only image(s) of 'pbc'" in note and "platelet are not in 'kaggle'" in note
    assert load_manifest_for(cfg).table.equals(manifest.table)  # seeded


def test_extra_training_images_are_cropped_by_stain_like_the_set_itself(tmp_path, monkeypatch):
    from test_stain import smear

    smear((200, 100, 241, 150)).save((tmp_path / "own" / "a").mkdir(parents=True) or tmp_path / "own" / "a" / "x.png")
    pbc = tmp_path / "data" / "pbc" / "PBC_dataset_normal_DIB"
    smear((20, 30, 61, 80)).save((pbc / "A").mkdir(parents=True) or pbc / "A" / "y.png")
    smear(None).save(pbc / "A" / "empty.png")
    monkeypatch.setenv("BLOODCELL_DATA", str(tmp_path / "data"))
    manifest = load_manifest_for(TrainConfig(dataset="folder", data_dir=str(tmp_path / "own"), crop="stain",
                                             crop_margin=0.5, extra_train="pbc"))
    boxes = dict(zip(manifest.table["path"].map(lambda path: Path(path).name), manifest.table["box"]))
    assert boxes["empty.png"] is None and all(isinstance(v, int) for v in boxes["y.png"] + boxes["x.png"])
    assert boxes["y.png"][0] < 20 and boxes["y.png"][2] > 61  # around the nucleus, whole pixels
    assert any("extra_train 'pbc': crop 'stain'" in note and "empty.png" in note for note in manifest.notes)


def test_drop_unknown_class_is_an_error(tmp_path):
    make_class_tree(tmp_path, {"a": 1})
    with pytest.raises(ValueError, match="drop_classes: zz not in"):
        load_manifest_for(TrainConfig(dataset="folder", data_dir=str(tmp_path), drop_classes=["zz"]))


def test_unknown_data_set_name():
    with pytest.raises(ValueError, match="unknown data set"):
        load_manifest("imagenet")


# --------------------------------------------------------------------------- real data
PBC_COUNTS = {"basophil": 1079, "eosinophil": 2798 - 1, "erythroblast": 1396, "ig": 2634, "lymphocyte": 1090,
              "monocyte": 1294, "neutrophil": 2989 - 1, "platelet": 2110}  # minus the cross-class pair
KAGGLE_COUNTS = {("train", "EOSINOPHIL"): 2497, ("train", "LYMPHOCYTE"): 2483, ("train", "MONOCYTE"): 2478,
                 ("train", "NEUTROPHIL"): 2499, ("test", "EOSINOPHIL"): 623, ("test", "LYMPHOCYTE"): 620,
                 ("test", "MONOCYTE"): 620, ("test", "NEUTROPHIL"): 624, ("test_simple", "EOSINOPHIL"): 13,
                 ("test_simple", "LYMPHOCYTE"): 6, ("test_simple", "MONOCYTE"): 4, ("test_simple", "NEUTROPHIL"): 48}
BCCD_COUNTS = {"NEUTROPHIL": 207, "EOSINOPHIL": 88, "LYMPHOCYTE": 33, "MONOCYTE": 20, "BASOPHIL": 3}


@pytest.mark.integration
def test_real_pbc():
    root = real_data("pbc")
    start = time.perf_counter()
    manifest = load_manifest("pbc", root)
    assert time.perf_counter() - start < 30
    assert manifest.table["label"].value_counts().to_dict() == PBC_COUNTS
    dropped = dict(zip(manifest.dropped["item"].map(lambda item: "/".join(Path(item).parts[-2:])),
                       manifest.dropped["kind"]))
    assert dropped == {"neutrophil/.DS_169665.jpg": "unreadable", "eosinophil/EO_225902.jpg": "ambiguous-duplicate",
                       "neutrophil/BNE_191112.jpg": "ambiguous-duplicate"}
    assert len(manifest.duplicates) == 12 and sum(entry["cross_class"] for entry in manifest.duplicates) == 1


@pytest.mark.integration
def test_real_kaggle():
    manifest = load_manifest("kaggle", real_data("blood-cells"))
    assert manifest.table.groupby(["split", "label"]).size().to_dict() == KAGGLE_COUNTS
    assert manifest.dropped.empty
    assert [sorted(Path(path).name for path in entry["paths"]) for entry in manifest.duplicates] == [
        ["_0_5239.jpeg", "_4_8814.jpeg"], ["_1_5031.jpeg", "_6_7701.jpeg"]]
    assert all("TEST_SIMPLE/EOSINOPHIL" in path for entry in manifest.duplicates for path in entry["paths"])


@pytest.mark.integration
def test_real_bccd():
    manifest = load_manifest("bccd", real_data("blood-cells"))
    assert manifest.table["label"].value_counts().to_dict() == BCCD_COUNTS
    # labels.csv has 411 data rows (Image 0..410): 352 single-label (one, Image 116, has no
    # image file), 15 multi-label, 44 blank. data/README.md says 410 rows / 43 blank.
    assert dropped_kinds(manifest) == {"no-label": 44, "multi-label": 15, "missing": 1}
    assert "BloodImage_00116.jpg" in manifest.dropped.set_index("kind").loc["missing", "item"]


@pytest.mark.integration
def test_real_bccd_cell_crops():
    manifest = load_manifest("bccd", real_data("blood-cells"), crop="cell")
    table = manifest.table
    whole = table["box"].isna()
    assert whole.sum() == len(manifest.notes) > 0
    assert all("whole image kept" in note for note in manifest.notes)
    assert (table["label"].value_counts() >= pd.Series(BCCD_COUNTS)).all()
    crops_per_image = table.groupby("path")["group"].agg(["size", "nunique"])
    assert (crops_per_image["size"] > 1).any() and (crops_per_image["nunique"] == 1).all()
    widths = table.loc[~whole, "box"].map(lambda box: box[2] - box[0])
    assert widths.between(40, 640).all()


def test_kaggle_augmented_copies_of_one_cell_share_a_group(tmp_path):
    # Two cells, two copies each (same colour, other size, so other bytes); dataset2's names do
    # not say which cell a copy comes from, so cell A's copies are _0_ and _1_ here.
    folder = tmp_path / "images" / "TRAIN" / "EOSINOPHIL"
    for name, color, size in (("_0_11.jpeg", 40, (8, 8)), ("_1_12.jpeg", 40, (10, 8)),
                              ("_1_13.jpeg", 200, (8, 8)), ("_0_14.jpeg", 200, (10, 8))):
        write_image(folder / name, color=(color, 90, 160), size=size, fmt="JPEG")
    write_image(tmp_path / "images" / "TRAIN" / "NEUTROPHIL" / "_0_15.jpeg", color=(40, 90, 160), size=(12, 8),
                fmt="JPEG")
    # A byte-identical copy joins its original's group too.
    (folder / "_2_16.jpeg").write_bytes((folder / "_1_13.jpeg").read_bytes())
    table = load_manifest("kaggle", tmp_path).table.set_index("path")
    group = {Path(path).name: g for path, g in table["group"].items()}
    assert group["_0_11.jpeg"] == group["_1_12.jpeg"]
    assert group["_1_13.jpeg"] == group["_0_14.jpeg"] == group["_2_16.jpeg"]
    assert len({group["_0_11.jpeg"], group["_1_13.jpeg"], group["_0_15.jpeg"]}) == 3  # per class and cell


def test_kaggle_files_not_named_like_dataset2_are_not_grouped_by_colour(tmp_path):
    folder = tmp_path / "images" / "TRAIN" / "EOSINOPHIL"
    write_image(folder / "a.jpeg", color=(40, 90, 160), fmt="JPEG")
    write_image(folder / "b.jpeg", color=(40, 90, 160), size=(10, 8), fmt="JPEG")
    manifest = load_manifest("kaggle", tmp_path)
    assert manifest.table["group"].nunique() == 2
    assert any("TRAIN" not in note and "train/EOSINOPHIL: file names not in dataset2's" in note
               for note in manifest.notes)


@pytest.mark.integration
def test_real_kaggle_groups_are_original_cells():
    table = load_manifest("kaggle", real_data("blood-cells")).table
    originals = table.groupby(["split", "label"])["group"].nunique().to_dict()
    # TEST holds augmented copies of the TEST_SIMPLE originals (13/6/4/48 cells).
    assert originals[("test", "EOSINOPHIL")] == 13 and originals[("test", "NEUTROPHIL")] == 48
    assert table[table["split"] == "train"]["group"].nunique() == 277
    # Each TEST original was copied equally often: the four monocytes 155 times each.
    monocytes = table[(table["split"] == "test") & (table["label"] == "MONOCYTE")]
    assert monocytes.groupby("group").size().between(150, 160).all()
    # The first number of a file name is not the cell: each such number spans several groups.
    position = monocytes["path"].str.extract(r"_(\d+)_\d+\.jpe?g$", expand=False)
    assert (monocytes.groupby(position)["group"].nunique() > 1).all()
