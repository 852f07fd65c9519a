"""Audit reports on tiny data sets and on the real data; nothing is ever written under a data root."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from bloodcell_lib.data.audit import audit_path, main
from bloodcell_lib.data.datasets import load_manifest
from bloodcell_lib.data.splits import make_splits

from conftest import real_data
from test_datasets import make_class_tree, make_kaggle, write_image


@pytest.fixture
def messy(tmp_path) -> Path:
    """Two classes with one same-class duplicate, one cross-class duplicate, a text file, a cut BMP."""
    root = make_class_tree(tmp_path / "cells", {"eos": 3, "neu": 2})
    (root / "eos" / "eos_copy.png").write_bytes((root / "eos" / "eos_0.png").read_bytes())
    (root / "neu" / "neu_copy.png").write_bytes((root / "eos" / "eos_1.png").read_bytes())
    (root / "neu" / ".DS_Store.jpg").write_text("definitely not an image")
    write_image(root / "neu" / "wide.png", size=(12, 8))
    bmp = write_image(root / "eos" / "cut.bmp", size=(32, 32), fmt="BMP")
    bmp.write_bytes(bmp.read_bytes()[:-500])  # header intact: only a full decode notices
    (root / "empty").mkdir()
    return root


def test_audit_of_a_messy_folder(messy):
    report = audit_path(messy)
    assert report["dataset"] == "folder" and report["classes"] == ["eos", "neu"]
    assert report["files_checked"] == 10 and report["readable_images"] == 8
    assert report["image_sizes"] == {"8x8": 7, "12x8": 1}
    assert sorted(Path(entry["path"]).name for entry in report["unreadable"]) == [".DS_Store.jpg", "cut.bmp"]
    assert any("truncated" in entry["reason"] or "corrupt" in entry["reason"] for entry in report["unreadable"])
    assert sorted(entry["cross_class"] for entry in report["duplicate_groups"]) == [False, True]
    cross = next(entry for entry in report["duplicate_groups"] if entry["cross_class"])
    assert cross["labels"] == ["eos", "neu"]
    # the cut BMP passed the cheap load-time check, so it is still a row; the audit flags it
    assert report["counts"] == {"(no split)": {"eos": 4, "neu": 3}}
    assert report["dropped_by_kind"] == {"ambiguous-duplicate": 2, "unreadable": 1}
    assert any("empty class folder" in note for note in report["notes"])
    json.dumps(report)  # JSON-ready as is


def test_audit_detects_kaggle_and_counts_per_split(tmp_path):
    make_kaggle(tmp_path / "dataset2-master" / "dataset2-master")
    report = audit_path(tmp_path)
    assert report["dataset"] == "kaggle"
    assert report["counts"]["train"] == {"EOSINOPHIL": 3, "NEUTROPHIL": 2}
    assert report["counts"]["test_simple"] == {"EOSINOPHIL": 1, "NEUTROPHIL": 0}


def test_audit_flags_groups_straddling_official_splits(tmp_path):
    folder = make_kaggle(tmp_path)
    leaked = folder / "images" / "TEST" / "EOSINOPHIL" / "leak.png"
    leaked.write_bytes((folder / "images" / "TRAIN" / "EOSINOPHIL" / "EOSINOPHIL_0.png").read_bytes())
    straddling = audit_path(tmp_path, "kaggle")["groups_across_splits"]
    assert len(straddling) == 1 and straddling[0]["splits"] == ["test", "train"]


def test_audit_refuses_ambiguous_layout(tmp_path):
    make_kaggle(tmp_path / "dataset2-master")
    (tmp_path / "dataset-master" / "JPEGImages").mkdir(parents=True)
    with pytest.raises(ValueError, match="several data sets .kaggle, bccd."):
        audit_path(tmp_path)


def test_cli_json_text_and_errors(messy, tmp_path, capsys):
    assert main([str(messy), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["readable_images"] == 8
    assert main([str(messy)]) == 0
    text = capsys.readouterr().out
    assert "ACROSS CLASSES" in text and "unreadable files (2)" in text and "total" in text
    assert main([str(tmp_path / "absent"), "--dataset", "pbc"]) == 2
    assert "does not exist" in capsys.readouterr().err


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under root with its size and modification time."""
    entries = {}
    for folder, _, files in os.walk(root):
        for name in [".", *files]:
            stat = os.stat(os.path.join(folder, name))
            entries[os.path.relpath(os.path.join(folder, name), root)] = (stat.st_size, stat.st_mtime_ns)
    return entries


def test_loading_splitting_and_auditing_write_nothing_into_the_data(messy):
    before = snapshot(messy)
    time.sleep(0.01)
    manifest = load_manifest("folder", messy)
    make_splits(manifest.table, val_fraction=0.2, test_fraction=0.2, seed=0)
    audit_path(messy)
    assert main([str(messy), "--json"]) == 0
    assert snapshot(messy) == before


@pytest.mark.integration
def test_real_pbc_audit():
    start = time.perf_counter()
    report = audit_path(real_data("pbc"))
    assert time.perf_counter() - start < 60
    assert report["dataset"] == "pbc" and len(report["classes"]) == 8
    assert report["readable_images"] == 15390 and report["image_sizes"] == {"200x200": 15390}
    assert [Path(entry["path"]).name for entry in report["unreadable"]] == [".DS_169665.jpg"]
    assert len(report["duplicate_groups"]) == 12
    cross = [entry for entry in report["duplicate_groups"] if entry["cross_class"]]
    assert [sorted(Path(path).name for path in entry["paths"]) for entry in cross] == [
        ["BNE_191112.jpg", "EO_225902.jpg"]]


@pytest.mark.integration
def test_real_kaggle_audit():
    report = audit_path(real_data("blood-cells", "dataset2-master"))
    assert report["dataset"] == "kaggle" and report["readable_images"] == report["files_checked"] == 12515
    assert [report["counts"][split][label] for split in ("train", "test", "test_simple")
            for label in ("EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL")] == [
        2497, 2483, 2478, 2499, 623, 620, 620, 624, 13, 6, 4, 48]
    assert len(report["duplicate_groups"]) == 2 and not report["groups_across_splits"]


@pytest.mark.integration
def test_real_bccd_audit():
    report = audit_path(real_data("blood-cells", "dataset-master"))
    assert report["dataset"] == "bccd" and report["rows"] == 351
    assert report["readable_images"] == 367 and report["image_sizes"] == {"640x480": 367}
    # 411 labels.csv rows = 351 usable + dropped (README: 410 rows, 43 blank; the file has 44)
    assert report["dropped_by_kind"] == {"no-label": 44, "multi-label": 15, "missing": 1}
