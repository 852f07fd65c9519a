"""The review page (evaluation/review_page.py) in headless Chromium: label cells with the
keyboard alone, save labels.csv, and ``adapt --labels`` reads what the page saved; the cell
data is escaped; a page of 2,000 cells opens quickly; predict --html writes the page."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
from test_predict import make_checkpoint
from test_suggest import LAB_CLASSES, copy_lisc_cells

from bloodcell_lib.evaluation import few_shot, predict, suggest
from bloodcell_lib.modeling.loaded import load_checkpoint
from bloodcell_lib.evaluation.review_page import render_review_page, write_review_page

pytest.importorskip("playwright")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    from bloodcell_lib.reporting.browser import CHROMIUM, launch_chromium

    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} missing (apt-get install chromium)")
    with sync_playwright() as p:
        browser = launch_chromium(p)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    """25 real LISC cells (5 per class) in one folder, unlabelled."""
    return copy_lisc_cells(tmp_path_factory.mktemp("lab") / "cells")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint_best.pt", classes=LAB_CLASSES)


def open_page(browser, path):
    page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(Path(path).absolute().as_uri(), wait_until="load")
    return page, errors


def test_label_with_keys_save_and_adapt_from_the_download(tmp_path, browser, cells, ckpt, capsys):
    out = tmp_path / "to_label"
    assert suggest.main(["--checkpoint", str(ckpt), str(cells), "--n", "25", "--out", str(out)]) == 0
    chosen = pd.read_csv(out / "to_label.csv")
    page, errors = open_page(browser, out / "review.html")
    assert page.locator(".cell").count() == 25
    assert page.text_content("#progress") == "0 of 25 labelled"
    # the technologist's answer for every cell in page order, from the file name (lisc_<cls>_...)
    prefix = {"Baoso": "1", "eosi": "2", "lymp": "3", "mono": "4", "neut": "5"}
    order = [json.loads(page.text_content("#review-data"))["cells"][i]["path"] for i in range(25)]
    keys = [prefix[Path(p).name.split("_")[1]] for p in order]
    keys[3], keys[7] = "x", "0"  # two cells marked unsure / not a white cell
    for key in keys[:23]:
        page.keyboard.press(key)  # labels the selected cell and moves to the next
    assert page.text_content("#progress") == "23 of 25 labelled"
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("Backspace")  # clears cell 23's label
    assert page.text_content("#progress") == "22 of 25 labelled"
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowLeft")
    page.keyboard.press(keys[22])
    assert page.text_content("#progress") == "23 of 25 labelled"
    page.select_option("#filter-flag", "unlabelled")
    assert page.locator(".cell:visible").count() == 2
    page.select_option("#filter-flag", "all")
    with page.expect_download() as download:
        page.click("#save")
    assert download.value.suggested_filename == "labels.csv"
    saved = tmp_path / "labels.csv"
    download.value.save_as(saved)
    assert errors == []
    table = pd.read_csv(saved)
    assert list(table.columns) == ["path", "label"] and len(table) == 23
    assert (table["label"] == "unsure").sum() == 2 and set(table["path"]) <= set(chosen["path"])
    assert table.set_index("path")["label"][order[0]] == LAB_CLASSES[int(keys[0]) - 1]
    page.close()

    lab = tmp_path / "lab.pt"
    rc = few_shot.main(["--checkpoint", str(ckpt), "--labels", str(saved), "--out", str(lab), "--epochs", "1",
                        "--unfreeze-last", "1", "--unlabelled", str(cells)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert text.count("skipped: marked unsure / not a white cell by the technologist") == 2
    assert "re-estimated on 25 unlabelled image(s)" in text
    assert "review flags refitted for the lab on 21 labelled cells by 3-fold cross-fitting" in text
    loaded = load_checkpoint(lab)
    record = loaded.config["adapted_from"]
    assert record["n_cells"] == 21 and len(record["rows_unsure"]) == 2 and record["rows_not_used"] == []
    assert loaded.calibration["fitted_on"].startswith("lab labels") and loaded.review["ood_score"] == "knn"
    assert loaded.feature_bank["n_per_class"] and len(loaded.feature_bank["features"]) == 21
    result = predict.predict_images(loaded, cells)
    assert len(result.predictions) == 25 and "needs_review" in result.predictions


def test_cell_data_is_escaped_and_filters_work(tmp_path, browser, cells):
    odd = tmp_path / "a<" / "script><b>&'x.png"  # the path reads a</script><b>&'x.png
    odd.parent.mkdir()
    shutil.copy(next(cells.iterdir()), odd)
    rows = [{"path": str(odd), "predicted": "lymphocyte", "confidence": 0.51, "needs_review": True,
             "review_reason": "low_confidence"}]
    rows += [{"path": str(p), "predicted": "neutrophil", "confidence": 0.99, "needs_review": False,
              "review_reason": ""} for p in sorted(cells.iterdir())[:4]]
    rows.append({"path": str(tmp_path / "gone.png"), "predicted": "neutrophil", "confidence": 0.9})
    html = write_review_page(rows[1:] + rows[:1], LAB_CLASSES, tmp_path / "page.html", "T <i>").read_text()
    assert "</script><b>" not in html and "T &lt;i&gt;" in html
    page, errors = open_page(browser, tmp_path / "page.html")
    assert errors == [] and page.locator(".cell").count() == 6
    assert page.locator(".cell").first.get_attribute("title") == str(odd)  # flagged first
    assert "no preview" in page.text_content("#grid")
    page.select_option("#filter-flag", "flagged")
    assert page.locator(".cell:visible").count() == 1
    page.select_option("#filter-flag", "all")
    page.select_option("#filter-class", "neutrophil")
    assert page.locator(".cell:visible").count() == 5
    page.close()


def test_a_page_of_2000_cells_opens_in_a_few_seconds(tmp_path, browser, cells):
    from PIL import Image

    from bloodcell_lib.evaluation.review_page import thumbnail

    thumb = thumbnail(Image.open(next(cells.iterdir())).convert("RGB"))
    page_cells = [{"path": f"/lab/cell_{i:04d}.png", "predicted": LAB_CLASSES[i % 5], "confidence": 0.5 + i / 4000,
                   "flag": i % 7 == 0, "reason": "low_confidence" if i % 7 == 0 else "", "box": None,
                   "thumb": thumb} for i in range(2000)]
    path = tmp_path / "big.html"
    path.write_text(render_review_page(page_cells, LAB_CLASSES, "2000 cells"))
    started = time.perf_counter()
    page, errors = open_page(browser, path)
    page.wait_for_selector("#progress")
    assert page.text_content("#progress") == "0 of 2000 labelled"
    page.keyboard.press("3")
    assert page.text_content("#progress") == "1 of 2000 labelled"
    seconds = time.perf_counter() - started
    assert errors == [] and seconds < 5, seconds
    page.close()


def test_predict_html_writes_the_review_page(tmp_path, ckpt, cells):
    assert predict.main(["--checkpoint", str(ckpt), str(cells), "--out", str(tmp_path / "p.csv"),
                         "--html", str(tmp_path / "review.html")]) == 0
    data = (tmp_path / "review.html").read_text()
    assert data.count('"thumb": "') == 25 and "Review 25 predicted cells" in data
