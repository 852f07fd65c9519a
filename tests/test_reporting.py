"""reporting.py: records, comparison table, index page, lock and swap (fast, no kernel), and the
smoke build's pages opened in headless Chromium (every image loads, every link resolves, no
console errors, the key figures are there)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from bloodcell_lib import reporting
from bloodcell_lib.config import make_config

from _smoke_build import experiment_names, smoke_build

CHROMIUM = os.environ.get("BLOODCELL_CHROMIUM", reporting.CHROMIUM)


# =========================================================================== fast unit tests

def fake_record(name="exp", **kw):
    record = {"name": name, "title": f"{name} title", "dataset": "pbc", "split": "70/10/20", "model": "m",
              "image_size": 64, "epochs": 1, "n_train": 10, "n_val": 2, "n_test": 5, "accuracy": 0.8,
              "accuracy_sd": 0.05, "balanced_accuracy": 0.7, "macro_f1": 0.6, "roc_auc_ovr": 0.9, "ece": 0.1,
              "per_class_f1": {"a": 0.5, "b": 0.7}, "class_names": ["a", "b"], "confusion_matrix": [[2, 1], [0, 2]],
              "train_seconds": 1.0, "total_seconds": 2.0, "profile": "smoke", "pretrained_requested": True,
              "pretrained_used": True, "init_note": None, "provenance": {}}
    record.update(kw)
    return record


def test_comparison_table_has_experiments_then_labelled_references():
    table = reporting.comparison_table([fake_record()])
    assert list(table["row"]) == ["experiment"] + ["reference"] * len(reporting.REFERENCES)
    assert table.iloc[0]["accuracy"] == "0.800 \u00b1 0.050"
    refs = table[table["row"] == "reference"]
    text = " ".join(refs["accuracy"])
    for number in ("0.714", "0.595", "0.85-0.89", "0.890", "0.963", "0.966", "0.983", "0.989", "0.990"):
        assert number in text
    assert refs["experiment"].str.contains("Student project").any()


def test_render_index_links_and_warns(tmp_path):
    root = tmp_path
    (root / "exp").mkdir()
    for nb in reporting.EXPERIMENT_NOTEBOOKS:
        (root / "exp" / f"{nb}.html").write_text("<html></html>")
        (root / "exp" / f"{nb}.ipynb").write_text("{}")
    note = reporting.init_message(True, False, "resnet34")
    page = reporting.render_index(root, [fake_record(pretrained_used=False, init_note=note)],
                                  info={"profile": "smoke"})
    assert 'href="exp/02_train.html"' in page and 'href="exp/03_evaluate.ipynb"' in page
    assert "<b>exp: Trained from random initialisation" in page
    assert "Smoke profile" in page and "0.714" in page


def test_build_record_reads_the_run_directory(tmp_path):
    cfg = make_config({"name": "exp", "dataset": "pbc", "model": "resnet18", "output_dir": str(tmp_path)})
    run = cfg.run_dir
    run.mkdir(parents=True)
    (run / "split.csv").write_text("path,label,split\na,x,train\nb,x,train\nc,y,val\nd,y,test\n")
    (run / "run_info.json").write_text(json.dumps({"timings": {"train_seconds": 3.5}, "split_sha256": "abc",
                                                   "pretrained": {"used": False}}))
    metrics = {"n": 1, "class_names": ["x", "y"], "accuracy": 1.0, "balanced_accuracy": 1.0, "macro_f1": 1.0,
               "roc_auc_ovr": None, "ece": 0.02, "per_class": {"x": {"f1": 0.0}, "y": {"f1": 1.0}},
               "confusion_matrix": [[0, 0], [0, 1]]}
    record = reporting.build_record(cfg, metrics)
    assert (record["n_train"], record["n_val"], record["n_test"]) == (2, 1, 1)
    assert record["train_seconds"] == 3.5 and record["pretrained_used"] is False
    assert "random initialisation" in record["init_note"]
    assert record["per_class_f1"] == {"x": 0.0, "y": 1.0}
    assert record["provenance"]["split_sha256"] == "abc"
    for field in reporting.RECORD_FIELDS:
        assert field in record


def test_build_record_uses_fold_means_for_cross_validation(tmp_path):
    cfg = make_config({"name": "cv", "dataset": "bccd", "model": "resnet18", "cv_folds": 2,
                       "output_dir": str(tmp_path)})
    for i in range(2):
        fold = cfg.run_dir / f"fold_{i}"
        fold.mkdir(parents=True)
        (fold / "split.csv").write_text("path,label,split\n" + "".join(f"p{i}{j},x,{s}\n" for j, s in
                                                                        enumerate(["train"] * 4 + ["test"] * 2)))
        (fold / "run_info.json").write_text(json.dumps({"timings": {"train_seconds": 2.0},
                                                        "pretrained": {"used": True}}))
    metrics = {"n": 4, "class_names": ["x"], "accuracy": 0.75, "per_class": {"x": {"f1": 0.8}},
               "cv": {"n_folds": 2, "metrics": {"accuracy": {"mean": 0.7, "sd": 0.1}},
                      "per_class_f1": {"x": {"mean": 0.6, "sd": 0.1}}}}
    record = reporting.build_record(cfg, metrics)
    assert record["accuracy"] == 0.7 and record["accuracy_sd"] == 0.1
    assert record["pooled"]["accuracy"] == 0.75
    assert record["n_test"] == 4 and record["n_train"] == 4
    assert record["train_seconds"] == 4.0 and record["pretrained_used"] is True


def test_discover_experiments_checks_keys_and_names(tmp_path, monkeypatch):
    (tmp_path / "ok.yaml").write_text("dataset: pbc\n")
    monkeypatch.setenv("BLOODCELL_EXPERIMENTS", str(tmp_path))
    assert reporting.discover_experiments()["ok"]["params"] == {"dataset": "pbc", "name": "ok"}
    (tmp_path / "mismatch.yaml").write_text("name: other\n")
    with pytest.raises(reporting.RunAllError, match="must equal the file name"):
        reporting.discover_experiments()
    (tmp_path / "mismatch.yaml").unlink()
    (tmp_path / "prof.yaml").write_text("profile: smoke\n")
    with pytest.raises(reporting.RunAllError, match="run_all.sh --profile"):
        reporting.discover_experiments()


def test_project_experiments_are_valid():
    from bloodcell_lib.config import make_config as mk

    found = reporting.discover_experiments([reporting.EXPERIMENTS_DIR])
    assert {"seed-replica", "bccd", "kaggle", "pbc"} <= set(found)
    for name, exp in found.items():
        for profile in ("full", "smoke"):
            mk({**exp["params"], "profile": profile})  # raises ConfigError on a bad value
    seed = found["seed-replica"]["params"]
    assert (seed["dataset"], seed["crop"], seed["model"], seed["optimizer"], seed["lr"], seed["epochs"],
            seed["balanced_sampling"], seed["image_size"], seed["pretrained"], seed["allow_random_init"]) == \
        ("bccd", "none", "resnet34", "adam", 0.01, 15, True, 224, True, True)
    assert found["bccd"]["params"]["crop"] == "cell" and found["bccd"]["params"]["cv_folds"] == 5


def test_lock_refuses_a_second_holder(tmp_path):
    first, second = reporting.BuildLock(tmp_path / "r"), reporting.BuildLock(tmp_path / "r")
    first.acquire(wait=False)
    try:
        with pytest.raises(reporting.LockBusy, match=f"PID {os.getpid()}"):
            second.acquire(wait=False)
    finally:
        first.release()
    second.acquire(wait=False)
    second.release()


def test_swap_in_replaces_the_whole_folder_and_keeps_the_lock_inode(tmp_path):
    live, staging = tmp_path / "reports", tmp_path / ".reports.staging-1"
    live.mkdir()
    (live / "old.txt").write_text("old")
    (live / ".lock").write_text("")
    staging.mkdir()
    (staging / "new.txt").write_text("new")
    os.link(live / ".lock", staging / ".lock")
    inode = (live / ".lock").stat().st_ino
    reporting.swap_in(staging, live)
    assert sorted(p.name for p in live.iterdir()) == [".lock", "new.txt"]
    assert (live / ".lock").stat().st_ino == inode
    assert not staging.exists()


def test_screenshot_renders_a_page(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    page = tmp_path / "page.html"
    page.write_text("<html><body><h1>hello</h1></body></html>")
    out = reporting.screenshot(page, tmp_path / "shot.png", width=400, height=300)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# =========================================================================== the smoke build in a browser

@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    build = smoke_build(tmp_path_factory)
    if build.returncode != 0:
        pytest.fail(f"./run_all.sh --profile smoke failed (exit {build.returncode}):\n{build.stderr[-4000:]}")
    return build


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = reporting.launch_chromium(p)
        yield b
        b.close()


def open_page(browser, path: Path):
    """Load a local page; return (page, console errors, page errors)."""
    page = browser.new_page()
    errors, page_errors = [], []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    page.on("requestfailed", lambda req: errors.append(f"request failed: {req.url}"))
    page.goto(path.as_uri(), wait_until="load")
    return page, errors, page_errors


def check_images(page, where: str) -> list[str]:
    images = page.eval_on_selector_all(
        "img", "els => els.map(e => ({src: e.currentSrc.slice(0, 80), w: e.naturalWidth, ok: e.complete, alt: e.alt}))")
    broken = [i["src"] for i in images if not i["ok"] or i["w"] == 0]
    assert not broken, f"{where}: images that did not load: {broken}"
    return [i["alt"] for i in images]


def check_links(page, path: Path) -> None:
    hrefs = page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)")
    for href in hrefs:
        url = urlparse(href)
        if url.scheme in ("http", "https", "mailto") or href.startswith("#") or not url.path:
            continue
        assert url.scheme == "file", f"{path}: unexpected link {href}"
        target = Path(unquote(url.path))
        assert target.exists(), f"{path}: link to missing file {href}"


@pytest.mark.slow
@pytest.mark.integration
def test_index_page_loads_cleanly(smoke, browser):
    index = smoke.reports / "index.html"
    page, errors, page_errors = open_page(browser, index)
    alts = check_images(page, "index.html")
    assert alts, "index.html shows no figures"
    check_links(page, index)
    hrefs = page.eval_on_selector_all("a[href]", "els => els.map(e => e.getAttribute('href'))")
    for name in experiment_names():
        for nb in ("01_explore", "02_train", "03_evaluate"):
            assert f"{name}/{nb}.html" in hrefs
    assert "04_report.html" in hrefs and "metrics.json" in hrefs
    text = page.inner_text("body")
    for number in ("0.714", "0.963", "0.990", "0.595"):
        assert number in text
    assert not errors and not page_errors, errors + page_errors
    page.close()


EXPECTED_FIGURES = {
    "01_explore": ("Bar chart of images per class and split", "Scatter plot of image sizes",
                   "Grid of sample images"),
    "02_train": ("Training curves",),
    "03_evaluate": ("Confusion matrix (counts)", "Confusion matrix (row-normalised)", "ROC curves",
                    "Reliability diagram", "Gallery of misclassified images", "Grad-CAM overlays",
                    "Per-class precision, recall and F1"),
}


@pytest.mark.slow
@pytest.mark.integration
def test_notebook_pages_load_and_show_their_figures(smoke, browser):
    pages = [(smoke.reports / name / f"{nb}.html", EXPECTED_FIGURES[nb])
             for name in experiment_names() for nb in EXPECTED_FIGURES]
    pages.append((smoke.reports / "04_report.html", ("Bar chart comparing held-out scores",
                                                     "Heatmap of per-class F1", "Training curves of",
                                                     "Confusion matrix (row-normalised) of")))
    for path, expected in pages:
        page, errors, page_errors = open_page(browser, path)
        alts = check_images(page, str(path))
        for want in expected:
            assert any(alt.startswith(want) for alt in alts), f"{path}: no figure '{want}' (have {alts})"
        check_links(page, path)
        assert not errors and not page_errors, f"{path}: {errors + page_errors}"
        page.close()


@pytest.mark.slow
@pytest.mark.integration
def test_report_page_compares_with_references(smoke):
    html = (smoke.reports / "04_report.html").read_text()
    for number in ("0.714", "0.85-0.89", "0.963", "0.966", "0.983", "0.989", "0.990", "0.595"):
        assert number in html
    for name in experiment_names():
        assert f'href="{name}/03_evaluate.html"' in html, f"04_report does not link {name}"
