"""A lab's labels file (evaluation/labels.py) and ``adapt --labels``: every row that cannot be used
is reported by its row number and reason, unsure rows as skipped by the technologist; paths
relative to the CSV's folder or absolute; boxes of count's cells."""
from __future__ import annotations

import shutil

import pytest
from test_predict import make_checkpoint
from test_suggest import LAB_CLASSES, copy_lisc_cells

from bloodcell_lib.evaluation import few_shot
from bloodcell_lib.evaluation.labels import read_labels
from bloodcell_lib.modeling.loaded import load_checkpoint
from bloodcell_lib.training.adapt import AdaptError


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    folder = copy_lisc_cells(tmp_path_factory.mktemp("lab") / "cells", per_class=1)
    (folder / "notes.txt").write_text("not a picture\n")
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint_best.pt", classes=LAB_CLASSES)


def write_bad_file(lab, csv_path):
    cells = sorted(p.name for p in lab.iterdir() if p.suffix == ".png")
    eos, neut, lymp = (next(c for c in cells if key in c) for key in ("eosi", "neut", "lymp"))
    lines = ["Path,Label",                                        # row 1: header (any case)
             f"cells/{eos},eosinophil",                           # row 2: relative to the CSV's folder
             f"cells/{lymp},blast",                               # row 3: unknown class
             "cells/gone.png,lymphocyte",                         # row 4: missing file
             f"cells/{lymp},lymphocyte,extra",                    # row 5: malformed (3 fields)
             f"cells/{lymp},",                                    # row 6: empty label
             "cells/notes.txt,monocyte",                          # row 7: not a picture
             f"cells/{lymp},unsure",                              # row 8: unsure
             f"{lab / eos},basophil",                             # row 9: the same cell as row 2
             "",                                                  # row 10: blank line
             f'"{lab / neut}",NEUTROPHIL']                        # row 11: absolute, quoted, any case
    csv_path.write_text("\n".join(lines) + "\n")
    return lab / eos, lab / neut


def test_bad_rows_are_reported_by_row_number(tmp_path, lab, ckpt):
    shutil.copytree(lab, tmp_path / "cells")
    eos, neut = write_bad_file(tmp_path / "cells", tmp_path / "labels.csv")
    cells = read_labels(tmp_path / "labels.csv", load_checkpoint(ckpt))
    assert cells.table[["row", "label"]].values.tolist() == [[2, "eosinophil"], [11, "neutrophil"]]
    assert cells.table["path"].tolist() == [str(eos.resolve()), str(neut.resolve())]
    assert tuple(cells.images.shape) == (2, 3, 32, 32)
    problems = dict(cells.problems)
    assert sorted(problems) == [3, 4, 5, 6, 7, 9]
    assert problems[3].startswith("unknown class 'blast'")
    assert problems[4].startswith("no such file") and "gone.png" in problems[4]
    assert problems[5] == "malformed: 3 field(s) where the header names 2"
    assert problems[6] == "malformed: empty label"
    assert "notes.txt" in problems[7] and "not an image" in problems[7]
    assert problems[9] == "the same cell as row 2, whose label is used"
    assert cells.unsure == [8]
    notes = cells.notes()
    assert len(notes) == 7 and any("row 8: skipped: marked unsure" in n for n in notes)


def test_adapt_labels_reports_every_row_and_refuses_a_file_without_header(tmp_path, lab, ckpt, capsys):
    shutil.copytree(lab, tmp_path / "cells")
    write_bad_file(tmp_path / "cells", tmp_path / "labels.csv")
    base = ["--checkpoint", str(ckpt), "--out", str(tmp_path / "lab.pt"), "--epochs", "1", "--unfreeze-last", "1"]
    assert few_shot.main([*base, "--labels", str(tmp_path / "labels.csv")]) == 0
    text = capsys.readouterr().out
    for row in (3, 4, 5, 6, 7, 9):
        assert f"labels.csv row {row}: " in text, row
    assert "row 8: skipped: marked unsure" in text and "only 2 labelled cell(s) (< 20)" in text
    record = load_checkpoint(tmp_path / "lab.pt").config["adapted_from"]
    assert record["rows_used"] == [2, 11] and [r["row"] for r in record["rows_not_used"]] == [3, 4, 5, 6, 7, 9]
    (tmp_path / "bare.csv").write_text(f"{tmp_path / 'cells' / 'x.png'},eosinophil\n")
    assert few_shot.main([*base, "--labels", str(tmp_path / "bare.csv")]) == 2
    assert "header naming the columns path and label" in capsys.readouterr().err
    assert few_shot.main([*base, "--labels", str(tmp_path / "labels.csv"), "--k", "3"]) == 2
    assert few_shot.main([*base, "--labels", str(tmp_path / "labels.csv"), "--folder", str(lab)]) == 2
    (tmp_path / "one.csv").write_text("path,label\ncells/gone.png,eosinophil\n")
    assert few_shot.main([*base, "--labels", str(tmp_path / "one.csv")]) == 2
    err = capsys.readouterr().err
    assert "need at least 2 usable labelled cells, found 0" in err and "row 2: no such file" in err


def test_boxes_crop_a_field(tmp_path, lab, ckpt):
    loaded = load_checkpoint(ckpt)
    cell = sorted(lab.glob("*.png"))[0]
    (tmp_path / "labels.csv").write_text("path,label,xmin,ymin,xmax,ymax\n"
                                         f"{cell},basophil,10,10,60,60\n{cell},eosinophil,,,,\n"
                                         f"{cell},basophil,5,5,oops,9\n{cell},basophil,5000,5000,5100,5100\n")
    cells = read_labels(tmp_path / "labels.csv", loaded)
    assert cells.table["box"].tolist() == [(10, 10, 60, 60), None]
    problems = dict(cells.problems)
    assert problems[4].startswith("malformed: box") and "lies outside" in problems[5]
    with pytest.raises(AdaptError, match="cannot be read"):
        read_labels(tmp_path / "nowhere.csv", loaded)
