"""Splits: stratified, seeded, group-safe; official splits kept; split files round-trip."""
from __future__ import annotations

import logging

import pandas as pd
import pytest

from bloodcell_lib.training.config import TrainConfig
from bloodcell_lib.data.catalog import COLUMNS, Manifest
from bloodcell_lib.data.datasets import load_manifest
from bloodcell_lib.core.fileio import sha256_file
from bloodcell_lib.data.splits import (kfold_splits, load_split, make_splits, save_split, splits_for)

from conftest import real_data


def make_table(counts: dict[str, int], group_size: int = 1, split: str = "") -> pd.DataFrame:
    """``counts[label]`` rows per class; every ``group_size`` consecutive rows of a class share a group."""
    rows = [{"path": f"/data/{label}/{index}.png", "label": label, "split": split,
             "group": f"{label}-{index // group_size}", "source": "test", "box": None}
            for label, count in counts.items() for index in range(count)]
    return pd.DataFrame(rows, columns=COLUMNS)


def assert_groups_in_one_split(table: pd.DataFrame) -> None:
    assert (table.groupby("group")["split"].nunique() == 1).all()


def test_stratified_fractions_and_groups():
    table = make_table({"a": 400, "b": 200, "c": 100}, group_size=4)
    out = make_splits(table, val_fraction=0.1, test_fraction=0.2, seed=0)
    shares = out["split"].value_counts(normalize=True)
    assert shares["test"] == pytest.approx(0.2, abs=0.02) and shares["val"] == pytest.approx(0.1, abs=0.02)
    per_class = pd.crosstab(out["label"], out["split"], normalize="index")
    assert per_class["test"].between(0.15, 0.25).all() and per_class["val"].between(0.05, 0.15).all()
    assert_groups_in_one_split(out)
    assert out.drop(columns="split").equals(table.drop(columns="split")) and table["split"].eq("").all()


def test_seeded():
    table = make_table({"a": 60, "b": 40})
    first = make_splits(table, val_fraction=0.1, test_fraction=0.2, seed=1)
    assert first.equals(make_splits(table, val_fraction=0.1, test_fraction=0.2, seed=1))
    assert not first.equals(make_splits(table, val_fraction=0.1, test_fraction=0.2, seed=2))


def test_tiny_class_still_trains():
    table = make_table({"big": 50, "tiny": 3})
    for seed in range(10):
        out = make_splits(table, val_fraction=0.1, test_fraction=0.2, seed=seed)
        assert (out.loc[out["label"] == "tiny", "split"] == "train").sum() >= 1


def test_very_small_table_falls_back_and_stays_group_safe():
    table = make_table({"a": 3, "b": 2}, group_size=1)
    out = make_splits(table, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert set(out["split"]) <= {"train", "val", "test"} and (out["split"] == "test").any()
    assert out.groupby("label")["split"].apply(lambda s: (s == "train").any()).all()


def test_official_splits_kept_and_val_carved_from_train_only():
    table = pd.concat([make_table({"a": 100, "b": 100}, group_size=2, split="train"),
                       make_table({"a": 20, "b": 20}, split="test").assign(path=lambda t: t["path"] + ".t",
                                                                         group=lambda t: t["group"] + "t"),
                       make_table({"a": 3}, split="test_simple").assign(group=lambda t: t["group"] + "s")],
                      ignore_index=True)
    out = make_splits(table, val_fraction=0.1, test_fraction=0.5, seed=0)
    changed = out["split"] != table["split"]
    assert (table.loc[changed, "split"] == "train").all() and (out.loc[changed, "split"] == "val").all()
    assert changed.sum() == pytest.approx(20, abs=4)
    assert out["split"].value_counts()[["test", "test_simple"]].tolist() == [40, 3]
    assert_groups_in_one_split(out)


def test_existing_val_is_kept():
    table = make_table({"a": 10}, split="train")
    table.loc[:2, "split"] = "val"
    assert make_splits(table, val_fraction=0.3, test_fraction=0.2, seed=0).equals(table)


def test_mixed_official_and_unsplit_rows_rejected():
    table = make_table({"a": 4})
    table.loc[0, "split"] = "train"
    with pytest.raises(ValueError, match="mixes"):
        make_splits(table, val_fraction=0.1, test_fraction=0.2, seed=0)


def test_kfold_partitions_rows_group_safely():
    table = make_table({"a": 60, "b": 30, "c": 10}, group_size=2)
    folds = kfold_splits(table, 5, val_fraction=0.1, seed=0)
    assert len(folds) == 5
    tested = pd.concat([fold.loc[fold["split"] == "test", "path"] for fold in folds])
    assert sorted(tested) == sorted(table["path"])  # every row tested exactly once
    for fold in folds:
        assert_groups_in_one_split(fold)
        assert fold["split"].value_counts(normalize=True)["val"] == pytest.approx(0.1, abs=0.03)
        assert set(fold.loc[fold["split"] == "test", "label"]) == {"a", "b", "c"}


def test_kfold_refuses_official_splits():
    with pytest.raises(ValueError, match="official splits"):
        kfold_splits(make_table({"a": 10}, split="train"), 3, val_fraction=0.1, seed=0)


def test_split_file_roundtrip_and_hash(tmp_path):
    table = make_splits(make_table({"a": 6, "b": 4}), val_fraction=0.2, test_fraction=0.2, seed=0)
    table["box"] = [(1, 2, 30, 40) if index % 2 else None for index in range(len(table))]
    path = save_split(table, tmp_path / "split.csv")
    assert path.read_text().splitlines()[0] == "path,label,split,group,source,xmin,ymin,xmax,ymax"
    assert path.read_text().splitlines()[1].endswith(",,,,")  # no box: empty corners
    pd.testing.assert_frame_equal(load_split(path), table)
    before = sha256_file(path)
    table.loc[0, "split"] = "val" if table.loc[0, "split"] != "val" else "test"
    assert sha256_file(save_split(table, path)) != before
    (tmp_path / "bad.csv").write_text("path,label\nx,a\n")
    with pytest.raises(ValueError, match="lacks column"):
        load_split(tmp_path / "bad.csv")


def manifest_of(counts: dict[str, int]) -> Manifest:
    table = make_table(counts)
    return Manifest(table, pd.DataFrame(), "test", None, sorted(counts))


def test_splits_for_makes_saves_and_reuses(tmp_path):
    cfg = TrainConfig(seed=0)
    manifest = manifest_of({"a": 30, "b": 20})
    first = splits_for(cfg, manifest, tmp_path / "run" / "split.csv")
    saved = tmp_path / "run" / "split.csv"
    assert saved.is_file()
    edited = first.copy()
    edited["split"] = "train"  # a saved split that make_splits would never produce ...
    save_split(edited, saved)
    assert splits_for(cfg, manifest, tmp_path / "run" / "split.csv").equals(edited)  # ... is reused, not remade


def test_splits_for_replaces_stale_split_and_refuses_on_resume(tmp_path, caplog):
    run = tmp_path / "run"
    stale, current = manifest_of({"a": 30, "b": 20}), manifest_of({"a": 31, "b": 20})
    splits_for(TrainConfig(), stale, run / "split.csv")
    with pytest.raises(ValueError, match="1 row.s. only in the data"):
        splits_for(TrainConfig(resume=True), current, run / "split.csv")
    with caplog.at_level(logging.WARNING):
        fresh = splits_for(TrainConfig(), current, run / "split.csv")
    assert "does not match" in caplog.text and len(load_split(run / "split.csv")) == len(fresh) == 51


def test_splits_for_rank_without_write_and_split_file(tmp_path):
    manifest = manifest_of({"a": 30, "b": 20})
    made = splits_for(TrainConfig(), manifest, tmp_path / "rank1" / "split.csv", write=False)
    assert not (tmp_path / "rank1").exists()
    assert made.equals(splits_for(TrainConfig(), manifest, tmp_path / "rank0" / "split.csv"))  # same seeded split
    chosen = save_split(made.assign(split="train"), tmp_path / "chosen.csv")
    used = splits_for(TrainConfig(split_file=str(chosen)), manifest, tmp_path / "run" / "split.csv")
    assert used["split"].eq("train").all() and (tmp_path / "run" / "split.csv").read_text() == chosen.read_text()
    with pytest.raises(FileNotFoundError):
        splits_for(TrainConfig(split_file=str(tmp_path / "none.csv")), manifest, tmp_path / "run" / "split.csv")


def test_splits_for_fold(tmp_path):
    manifest = manifest_of({"a": 30, "b": 20})
    cfg = TrainConfig(cv_folds=5)
    tests = [set(splits_for(cfg, manifest, tmp_path / f"fold{fold}" / "split.csv", fold=fold).query("split == 'test'")["path"])
             for fold in range(5)]
    assert sum(map(len, tests)) == 50 and len(set().union(*tests)) == 50


def test_rows_of_another_data_set_only_train_and_leave_the_split_unchanged(tmp_path):
    own = manifest_of({"a": 30, "b": 20})
    extra = make_table({"a": 4, "b": 3}, split="train").assign(source="other")
    extra["path"] = extra["path"].str.replace("/data/", "/other/")
    mixed = Manifest(pd.concat([own.table, extra], ignore_index=True), pd.DataFrame(), "test", None, ["a", "b"])
    for cfg, fold in ((TrainConfig(), None), (TrainConfig(cv_folds=5), 2)):
        alone = splits_for(cfg, own, tmp_path / "alone" / "split.csv", fold=fold)
        split = splits_for(cfg, mixed, tmp_path / "mixed" / "split.csv", fold=fold)
        assert split.iloc[:len(alone)].equals(alone)
        assert split.iloc[len(alone):].query("split == 'train'")["path"].tolist() == extra["path"].tolist()
        assert splits_for(cfg, mixed, tmp_path / "mixed" / "split.csv", fold=fold).equals(split)  # the saved file matches


@pytest.mark.integration
def test_real_kaggle_keeps_official_test():
    table = load_manifest("kaggle", real_data("blood-cells")).table
    out = make_splits(table, val_fraction=0.1, test_fraction=0.2, seed=0)
    counts = out["split"].value_counts().to_dict()
    assert counts["test"] == 2487 and counts["test_simple"] == 71
    # val holds whole original cells (about 33 augmented copies each), so it is 10 % only roughly.
    assert counts["val"] == pytest.approx(9957 / 10, rel=0.15) and counts["train"] + counts["val"] == 9957
    assert_groups_in_one_split(out)


@pytest.mark.integration
def test_real_bccd_crops_stay_together():
    table = load_manifest("bccd", real_data("blood-cells"), crop="cell").table
    out = make_splits(table, val_fraction=0.1, test_fraction=0.2, seed=0)
    assert_groups_in_one_split(out)
    assert (out.loc[out["label"] == "BASOPHIL", "split"] == "train").any()
