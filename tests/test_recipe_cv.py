"""benchmarks/recipe_cv.py on a tiny Kaggle-like tree: folds inside TRAIN, TEST never used."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from bloodcell_lib.data import datasets

from conftest import benchmark_script
from test_benchmark import tiny_jpegs  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def recipe_cv():
    with benchmark_script("recipe_cv") as module:
        yield module


@pytest.fixture
def kaggle_like(tmp_path, tiny_jpegs):  # noqa: F811
    """The tiny shapes as a dataset2 tree: 8 TRAIN and 4 TEST pictures per class."""
    for label in ("circle", "square", "stripes"):
        files = sorted((tiny_jpegs / label).iterdir())
        for split, chosen in (("TRAIN", files[:8]), ("TEST", files[8:])):
            folder = tmp_path / "images" / split / label.upper()
            folder.mkdir(parents=True)
            for index, file in enumerate(chosen):
                (folder / f"_{index}_{index}.jpeg").write_bytes(file.read_bytes())
    return tmp_path


def test_folds_hold_out_train_cells_and_leave_test_alone(recipe_cv, kaggle_like):
    manifest = datasets.load_manifest("kaggle", kaggle_like)
    tables = recipe_cv.fold_split_tables(manifest, 2, 3, seed=0)
    held = [set(t.loc[t["split"] == "val", "path"]) for t in tables]
    train_side = set(manifest.table.loc[manifest.table["split"] == "train", "path"])
    assert held[0].isdisjoint(held[1]) and held[0] | held[1] == train_side
    for table in tables:
        assert table.loc[manifest.table["split"] == "test", "split"].eq("test").all()
        assert table[table["split"] == "train"]["label"].value_counts().max() <= 3
        assert set(table["split"]) <= {"train", "val", "test", "unused"}


def test_a_set_without_official_splits_is_refused(recipe_cv, tiny_jpegs):  # noqa: F811
    with pytest.raises(ValueError, match="no official TRAIN / TEST split"):
        recipe_cv.fold_split_tables(datasets.load_manifest("folder", tiny_jpegs), 2, 0, seed=0)


def test_runs_every_fold_and_writes_json(recipe_cv, kaggle_like, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(f"dataset: kaggle\ndata_dir: {kaggle_like}\nmodel: resnet18\npretrained: false\n"
                      "allow_random_init: true\nimage_size: 32\nepochs: 1\nbatch_size: 4\nmonitor: val_acc\n")
    out = tmp_path / "cv.json"
    assert recipe_cv.main([str(config), "--folds", "2", "--train-per-class", "0", "--set", "seed=1",
                           "--work-dir", str(tmp_path / "runs"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [row["fold"] for row in result["folds"]] == [0, 1]
    assert result["summary"]["tta"]["cells"] == 24  # every TRAIN picture held out once (each its own cell)
    assert sum(row["train_images"] for row in result["folds"]) == 24
    saved = yaml.safe_load((tmp_path / "runs" / "fold_0" / "config.yaml").read_text())
    assert saved["monitor"] == "none" and saved["seed"] == 1  # the held-out fold chooses nothing
    assert "| mean |" in capsys.readouterr().out


def test_members_train_on_their_own_draws_of_the_same_folds(recipe_cv, kaggle_like, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(f"dataset: kaggle\ndata_dir: {kaggle_like}\nmodel: resnet18\npretrained: false\n"
                      "allow_random_init: true\nimage_size: 32\nepochs: 1\nbatch_size: 4\nseed: 1\n")
    out = tmp_path / "cv.json"
    runs = tmp_path / "runs"
    assert recipe_cv.main([str(config), "--folds", "2", "--train-per-class", "2", "--members", "2",
                           "--work-dir", str(runs), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["members"] == 2
    for row in result["folds"]:
        assert len(row["tta"]["members_accuracy"]) == 2
        assert 0 <= row["tta"]["accuracy"] <= 1
    seeds = [yaml.safe_load((runs / f"fold_0_member_{m}" / "config.yaml").read_text())["seed"] for m in (0, 1)]
    assert seeds == [1, 2]
    first, second = (pd.read_csv(runs / f"split_fold_0_member_{m}.csv") for m in (0, 1))
    assert first.loc[first["split"] == "val", "path"].tolist() == second.loc[second["split"] == "val", "path"].tolist()
    assert set(first.loc[first["split"] == "train", "path"]) != set(second.loc[second["split"] == "train", "path"])


def test_a_single_member_draw_is_the_former_draw(recipe_cv, kaggle_like):
    manifest = datasets.load_manifest("kaggle", kaggle_like)
    default = recipe_cv.fold_split_tables(manifest, 2, 3, seed=0)
    first_draw = recipe_cv.fold_split_tables(manifest, 2, 3, seed=0, draw=0)
    other_draw = recipe_cv.fold_split_tables(manifest, 2, 3, seed=0, draw=1)
    assert all(a.equals(b) for a, b in zip(default, first_draw))
    assert not all(a["split"].equals(b["split"]) for a, b in zip(default, other_draw))


def test_members_below_one_are_refused(recipe_cv, capsys):
    with pytest.raises(SystemExit):
        recipe_cv.parse_args(["experiments/kaggle.yaml", "--members", "0"])
    assert "--members must be >= 1 (got 0)" in capsys.readouterr().err
