"""count.py, differential.py, count_report.py, field_scores.py: fields in, a differential out."""
from __future__ import annotations


import pandas as pd
import pytest

from bloodcell_lib.__main__ import main as cli
from bloodcell_lib.evaluation import field_scores
from bloodcell_lib.evaluation.count import NO_CELL_REASON, count_fields
from bloodcell_lib.evaluation.differential import differential, wilson_interval
from bloodcell_lib.modeling.loaded import load_checkpoint
from tests.conftest import real_data
from tests.test_nuclei import field
from tests.test_predict import CLASSES, make_checkpoint


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_checkpoint(make_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint_best.pt"))


@pytest.fixture
def fields(tmp_path):
    folder = tmp_path / "fields"
    folder.mkdir()
    field([(150, 150, 45), (450, 320, 40)]).save(folder / "two.jpg")
    field([]).save(folder / "pale.png")
    field([(320, 240, 45)]).convert("RGBA").save(folder / "rgba.png")
    (folder / "notes.txt").write_text("not a picture")
    return folder


def test_wilson_against_reference_values():
    # Newcombe (1998), Stat Med 17:857, table II: 81/263 -> 0.2553 to 0.3662; 0/10 and 8/10 by hand.
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-5)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=5e-5)
    assert wilson_interval(8, 10) == pytest.approx((0.49016, 0.94331), abs=5e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="count=3, total=2"):
        wilson_interval(3, 2)


def test_differential_counts_and_percentages():
    table = differential(["a", "b", "a", "a"], ["a", "b", "c"], "x")
    assert list(table["count"]) == [3, 1, 0] and list(table["percent"]) == [75.0, 25.0, 0.0]
    assert (table["ci_low"] <= table["percent"]).all() and (table["percent"] <= table["ci_high"]).all()


def test_count_fields_writes_every_output(tmp_path, fields, loaded):
    out = tmp_path / "out"
    result = count_fields(loaded, fields, out)
    cells = pd.read_csv(out / "cells.csv")
    assert list(cells.columns[:8]) == ["path", "cell", "xmin", "ymin", "xmax", "ymax", "predicted", "confidence"]
    assert [c for c in cells.columns if c.startswith("prob_")] == [f"prob_{c}" for c in CLASSES]
    assert sorted(cells["path"].map(lambda p: p.rsplit("/", 1)[-1])) == ["rgba.png", "two.jpg", "two.jpg"]
    listed = pd.read_csv(out / "fields.csv", keep_default_na=False)
    assert listed.set_index(listed["path"].str.rsplit("/", n=1).str[-1])["reason"]["pale.png"] == NO_CELL_REASON
    skipped = pd.read_csv(out / "skipped.csv")
    assert len(skipped) == 1 and skipped["path"][0].endswith("notes.txt") and "not" in skipped["reason"][0]
    folder_rows = result.differential[result.differential["level"] == "folder"]
    assert folder_rows["count"].sum() == 3 and (folder_rows["total"] == 3).all()
    html = (out / "index.html").read_text()
    for name in ("two.jpg", "pale.png", "rgba.png", "notes.txt"):
        assert name in html
    assert len(list((out / "overlays").glob("*.png"))) == 3


def test_cells_get_the_checkpoints_review_flags(tmp_path, fields):
    review = {"confidence_threshold": 1.01, "ood_score": "energy", "ood_threshold": 1e9}  # every cell doubtful
    calibration = {"method": "temperature", "temperature": 1.0, "n": 10, "fitted_on": "val",
                   "ece_before": 0.1, "ece_after": 0.1}
    checkpoint = make_checkpoint(tmp_path / "calibrated.pt", review=review, calibration=calibration)
    result = count_fields(load_checkpoint(checkpoint), fields / "two.jpg", tmp_path / "out", overlays=False)
    cells = pd.read_csv(tmp_path / "out" / "cells.csv", keep_default_na=False)
    assert len(cells) == 2 and cells["needs_review"].all() and set(cells["review_reason"]) == {"low_confidence"}
    assert "ood_score" in cells and "2 cells: 0 accepted, 2 to review" in result.summary()


def test_cli_counts_and_rejects_bad_arguments(tmp_path, fields, loaded, capsys):
    checkpoint = loaded.path
    assert cli(["count", "--checkpoint", checkpoint, str(fields), "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("3 field(s): 3 white cell(s) in 2, none found in 1; 1 file(s) skipped")
    assert "skipped" in printed and "notes.txt" in printed
    assert cli(["count", "--checkpoint", checkpoint, str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert cli(["count", "--checkpoint", str(tmp_path / "none.pt"), str(fields)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_match_boxes_one_to_one():
    found = [(0, 0, 10, 10), (1, 1, 11, 11), (50, 50, 60, 60)]
    assert field_scores.match_boxes(found, [(0, 0, 10, 10)]) == [(0, 0)]
    assert field_scores.iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)


@pytest.mark.integration
def test_bccd_fields_scored(tmp_path):
    folder = real_data("blood-cells", "dataset-master")
    picked = [f for f in field_scores.bccd_fields(folder) if f.path.endswith(("00043.jpg", "00000.jpg"))]
    detected = field_scores.detect_fields(picked)
    scores = field_scores.detection_scores(detected)
    assert scores["annotated_cells"] == 3 and scores["recall"] == 1.0
    assert field_scores.error_gallery(detected, "missed") is None


def test_count_speed_benchmark_runs(tmp_path, fields, loaded):
    from tests.conftest import benchmark_script

    with benchmark_script("count_speed") as bench:
        out = tmp_path / "speed.json"
        assert bench.main(["--checkpoint", loaded.path, "--data-dir", str(fields), "--fields", "2",
                           "--out", str(out), "--no-overlays"]) == 0
    # fields of the folder given are *.jpg only: two.jpg
    assert '"fields": 1' in out.read_text() and '"cpu_s"' in out.read_text()
