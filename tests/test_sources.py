"""Sources and labs, the LISC loader, the multi-source manifest and its leave-one-lab-out split,
and the config fields that ask for them."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from conftest import real_data

from bloodcell_lib.data import sources
from bloodcell_lib.data.catalog import SAME_IMAGES
from bloodcell_lib.data.datasets import load_manifest
from bloodcell_lib.data.multisource import load_multi
from bloodcell_lib.data.splits import source_splits
from bloodcell_lib.training.config import ConfigError, make_config

LISC_COUNTS = {"basophil": 47, "eosinophil": 36, "lymphocyte": 49, "monocyte": 46, "neutrophil": 47}
MULTI = {"dataset": "multi", "sources": ["pbc", "bccd", "lisc"], "crop": "nucleus", "model": "resnet18"}


def test_same_images_follow_the_labs():
    assert SAME_IMAGES["bccd"] == ("bccd", "kaggle") and SAME_IMAGES["kaggle"] == ("kaggle", "bccd")
    assert SAME_IMAGES["pbc"] == ("pbc",) and SAME_IMAGES["lisc"] == ("lisc",)
    with pytest.raises(ValueError, match="'nowhere'"):
        sources.lab_of("nowhere")


def test_class_names_map_onto_the_shared_classes_ignoring_case():
    assert sources.shared_class(" NEUTROPHIL") == "neutrophil" and sources.shared_class("Basophil") == "basophil"
    assert sources.shared_class("ig") is None and sources.shared_class("platelet") is None


def test_trained_and_tested_sources_of_a_config():
    lolo_bccd = {"dataset": "multi", "sources": ["pbc", "bccd", "lisc"], "test_source": "bccd"}
    assert sources.trained_sources(lolo_bccd) == ["pbc", "lisc"]
    assert sources.tested_sources(lolo_bccd) == ("bccd", "kaggle")  # one lab: Kaggle is made of BCCD
    assert set(sources.tested_sources({**lolo_bccd, "test_source": None})) == {"pbc", "bccd", "kaggle", "lisc"}
    assert sources.trained_sources({"dataset": "bccd", "extra_train": "pbc"}) == ["bccd", "pbc"]
    assert sources.tested_sources({"dataset": "csv"}) == ()


def test_multi_needs_its_config():
    with pytest.raises(ValueError, match="load_manifest_for"):
        load_manifest("multi")


@pytest.mark.parametrize("params, message", [
    ({"sources": ["pbc"]}, "'sources'.*at least two"),
    ({"sources": ["pbc", "kaggle"]}, "'sources' = 'kaggle'"),
    ({"sources": ["pbc", "pbc"]}, "one lab twice"),
    ({"test_source": "kaggle"}, "'test_source' = 'kaggle'.*pbc, bccd, lisc"),
    ({"crop": "cell"}, "'crop' = 'cell'"),
    ({"extra_train": "kaggle"}, "'extra_train'"),
    ({"cv_folds": 3}, "'cv_folds'"),
    ({"source_per_class": -1}, "'source_per_class'"),
    ({"per_source_balanced": True, "balanced_sampling": True}, "two samplers"),
])
def test_multi_config_validation_names_the_parameter(params, message):
    with pytest.raises(ConfigError, match=message):
        make_config({**MULTI, **params})


@pytest.mark.parametrize("name, value", [("sources", ["pbc", "lisc"]), ("test_source", "pbc"),
                                         ("source_per_class", 5), ("per_source_balanced", True)])
def test_multi_fields_need_dataset_multi(name, value):
    with pytest.raises(ConfigError, match=f"'{name}'.*needs dataset = 'multi'"):
        make_config({"dataset": "pbc", "model": "resnet18", name: value})


def test_a_valid_multi_config():
    cfg = make_config({**MULTI, "test_source": "lisc", "source_per_class": 10, "per_source_balanced": True,
                       "augment": "stain"})
    assert cfg.test_source == "lisc" and cfg.augment == "stain"


# --------------------------------------------------------------------------- real data
@pytest.mark.integration
def test_real_lisc():
    manifest = load_manifest("lisc", real_data("lisc"))
    table = manifest.table
    assert table["label"].value_counts().to_dict() == LISC_COUNTS and len(table) == 225
    assert (table["source"] == "lisc").all() and table["group"].nunique() == 225  # group = file
    assert manifest.dropped.empty


@pytest.fixture(scope="module")
def multi():
    real_data("pbc"), real_data("lisc"), real_data("blood-cells")
    return load_multi(["pbc", "bccd", "lisc"], crop="nucleus", margin=0.5, per_class=12, seed=0)


@pytest.mark.integration
def test_real_multi_manifest(multi):
    table = multi.table
    assert multi.classes == list(sources.SHARED_CLASSES)
    counts = table.groupby("source")["label"].value_counts()
    assert counts.max() <= 12 and set(table["source"]) == {"pbc", "bccd", "lisc"}
    assert counts["bccd"]["basophil"] == 3  # BCCD has 3 basophils: the cap leaves small classes whole
    assert all(group.startswith(source + ":") for source, group in zip(table["source"], table["group"]))
    assert table["path"][table["source"] == "lisc"].str.contains("/LISC_crops/").all()
    # every source cropped by the nucleus crop (a square box), PBC's ig/erythroblast/platelet left out
    found = table[table["box"].notna()]
    assert len(found) >= 0.95 * len(table)
    assert all(box[2] - box[0] == pytest.approx(box[3] - box[1], abs=1) for box in found["box"])
    assert set(multi.dropped.loc[multi.dropped["kind"] == "drop_classes", "item"]) == {
        "pbc class erythroblast", "pbc class ig", "pbc class platelet"}


@pytest.mark.integration
def test_the_held_out_lab_is_not_capped_by_the_training_cap():
    manifest = load_multi(["pbc", "lisc"], crop="none", per_class=12, seed=0, held_out="lisc")
    counts = manifest.table.groupby("source")["label"].value_counts()
    assert counts["lisc"].sum() == 225 and counts["pbc"].max() == 12  # every LISC cell, PBC capped
    capped = load_multi(["pbc", "lisc"], crop="none", per_class=12, seed=0, held_out="lisc", held_out_per_class=20)
    assert capped.table.groupby("source")["label"].value_counts()["lisc"].max() == 20


@pytest.mark.integration
@pytest.mark.parametrize("test_source", ["pbc", "bccd", "lisc"])
def test_leave_one_lab_out_split_keeps_the_test_lab_out(multi, test_source):
    split = source_splits(multi.table, test_source=test_source, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert len(split) == len(multi.table)
    held_out = split["source"] == test_source
    assert (split.loc[held_out, "split"] == "test").all() and (split.loc[~held_out, "split"] != "test").all()
    seen = split[split["split"].isin(["train", "val"])]
    for source in set(split["source"]) - {test_source}:
        assert set(seen.loc[seen["source"] == source, "split"]) == {"train", "val"}  # val of every training lab
    tested = split[held_out]
    assert not set(tested["group"]) & set(seen["group"]) and not set(tested["path"]) & set(seen["path"])
    # Kaggle dataset2 is the BCCD lab: never a training source when BCCD is tested, nor the reverse
    assert not set(sources.trained_sources({"dataset": "multi", "sources": list(set(split["source"])),
                                            "test_source": test_source})) & set(SAME_IMAGES[test_source])


@pytest.mark.integration
def test_general_split_holds_out_part_of_every_lab(multi):
    split = source_splits(multi.table, test_source=None, val_fraction=0.15, test_fraction=0.2, seed=0)
    assert set(split.groupby("source")["split"].unique().map(frozenset)) == {frozenset({"train", "val", "test"})}
    groups = split.groupby("group")["split"].nunique()
    assert (groups == 1).all()  # no leakage group on two sides
    assert isinstance(split, pd.DataFrame) and Path(split["path"][0]).is_file()
