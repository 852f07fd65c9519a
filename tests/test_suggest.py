"""suggest.py: N cells chosen (typical of k-means clusters + least certain), the CSV's columns,
unreadable files listed, the same choice for the same seed, clear errors. Real LISC cells,
a tiny randomly initialised model."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from test_predict import make_checkpoint

from bloodcell_lib.evaluation import suggest
from conftest import real_data

LAB_CLASSES = ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]


def copy_lisc_cells(folder, per_class=5):
    """``folder`` with the first ``per_class`` real LISC cells of each class, all in it (no labels)."""
    source = real_data("lisc", "LISC_crops")
    folder.mkdir()
    for label in LAB_CLASSES:
        for path in sorted((source / label).iterdir())[:per_class]:
            shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory):
    """5 real LISC cells per class in one flat folder (no labels), and one file that is not a picture."""
    folder = copy_lisc_cells(tmp_path_factory.mktemp("lab") / "unlabelled")
    (folder / "notes.txt").write_text("not a cell\n")
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint_best.pt", classes=LAB_CLASSES)


def run(ckpt, folder, out, *extra):
    return suggest.main(["--checkpoint", str(ckpt), str(folder), "--out", str(out), *extra])


def test_suggest_writes_n_cells_the_page_and_the_skipped_file(tmp_path, ckpt, unlabelled, capsys):
    out = tmp_path / "to_label"
    assert run(ckpt, unlabelled, out, "--n", "10") == 0
    text = capsys.readouterr().out
    assert "suggested 10 of 25 readable cell(s): 8 typical of their cluster, 2 least certain; skipped 1" in text
    table = pd.read_csv(out / "to_label.csv")
    assert list(table.columns) == ["path", "predicted", "confidence", "reason"]
    assert len(table) == table["path"].nunique() == 10
    assert table["reason"].tolist() == [f"typical of cluster {i}" for i in range(1, 9)] + ["least certain"] * 2
    assert set(table["predicted"]) <= set(LAB_CLASSES) and table["confidence"].between(0, 1).all()
    assert all(p.startswith(str(unlabelled)) for p in table["path"])
    skipped = pd.read_csv(out / "suggest_skipped.csv")
    assert skipped["path"].tolist() == [str(unlabelled / "notes.txt")] and "not an image" in skipped["reason"][0]
    page = (out / "review.html").read_text()
    assert page.count("lisc_") >= 10 and "notes.txt" not in page
    # the least certain cells are those with the smallest margins among the cells not taken as typical
    assert run(ckpt, unlabelled, out, "--n", "10", "--seed", "0") == 0
    assert pd.read_csv(out / "to_label.csv").equals(table)  # same seed, same cells


def test_choose_typical_then_least_certain():
    rng = np.random.default_rng(0)
    centres = np.eye(4) * 5  # four well separated groups of 10 cells: n = 5 takes 4 typical + 1 uncertain
    features = np.concatenate([c + rng.normal(0, 0.1, (10, 4)) for c in centres])
    proba = np.full((40, 2), 0.5)
    proba[:, 0] = np.linspace(0.55, 0.99, 40)
    proba[:, 1] = 1 - proba[:, 0]
    paths = [f"cell{i:02d}" for i in range(40)]
    picked = suggest.choose(features, proba, paths, 5, seed=1)
    typical = [row for row, reason in picked if reason.startswith("typical")]
    assert len(typical) == 4 and sorted(row // 10 for row in typical) == [0, 1, 2, 3]  # one per cluster
    assert picked[4] == (min(set(range(40)) - set(typical)), suggest.LEAST_CERTAIN)  # smallest margin left
    assert suggest.choose(features, proba, paths, 5, seed=1) == picked
    assert [row for row, _ in suggest.choose(features[:3], proba[:3], paths[:3], 5)] == [0, 1, 2]


def test_suggest_refuses_bad_parameters(tmp_path, ckpt, unlabelled, capsys):
    assert run(ckpt, unlabelled, tmp_path / "o", "--n", "0") == 2
    assert "--n must be >= 1" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run(ckpt, tmp_path / "empty", tmp_path / "o", "--n", "3") == 2
    assert "the folder is empty" in capsys.readouterr().err
    assert run(tmp_path / "missing.pt", unlabelled, tmp_path / "o", "--n", "3") == 2
    assert "missing.pt: no such file" in capsys.readouterr().err
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("no picture\n")
    assert run(ckpt, junk, tmp_path / "o", "--n", "3") == 1
    assert "no readable cell picture" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
