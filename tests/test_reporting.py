"""The reporting package (records, study data, comparison, targets, ablation, index.html): fast unit tests (no kernel);
browser.py's screenshot; and the smoke build's pages opened in headless Chromium (every image
loads, every link resolves, no console errors, the key figures are there)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from bloodcell_lib.reporting import browser as chromium
from bloodcell_lib.evaluation import crosslab
from bloodcell_lib.reporting import summary as reporting
from bloodcell_lib.reporting.study import load_study
from bloodcell_lib.training.config import make_config

from _smoke_build import experiment_names, smoke_build

CHROMIUM = os.environ.get("BLOODCELL_CHROMIUM", chromium.CHROMIUM)


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


def test_comparison_table_says_where_the_weights_started():
    records = [fake_record(name="a"), fake_record(name="b", pretrained_used=False),
               full_record("c", "bccd", config={"init_from": "pbc"})]
    table = reporting.comparison_table(records, references=False)
    assert list(table["init"]) == ["pretrained", "RANDOM INIT", "from pbc"]


def test_render_index_links_and_warns(tmp_path):
    root = tmp_path
    (root / "exp").mkdir()
    for nb in reporting.EXPERIMENT_NOTEBOOKS:
        (root / "exp" / f"{nb}.html").write_text("<html></html>")
        (root / "exp" / f"{nb}.ipynb").write_text("{}")
    note = reporting.init_message(True, False, "resnet34")
    page = reporting.render_index(root, reporting.metrics_document([fake_record(pretrained_used=False, init_note=note)],
                                                                   profile="smoke"))
    assert 'href="exp/02_train.html"' in page and 'href="exp/03_evaluate.ipynb"' in page
    assert "<b>exp: Trained from random initialisation" in page
    assert "Smoke profile" in page and "0.714" in page


def test_render_index_escapes_every_value(tmp_path):
    odd = "<img src=x onerror=alert(1)>"
    page = reporting.render_index(tmp_path, reporting.metrics_document([fake_record(name="a&b", title=odd)],
                                                                       profile=odd))
    assert odd not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "<h3>a&amp;b</h3>" in page


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
    with_tta = {**metrics, "accuracy": 0.8, "cv": {"n_folds": 2, "metrics": {"accuracy": {"mean": 0.78, "sd": 0.02}}}}
    params = {"name": "cv", "image_size": 224, "profile": "smoke"}
    record = reporting.build_record(cfg, metrics, no_tta=metrics, tta=with_tta, parameters=params)
    assert record["accuracy"] == 0.7 and record["accuracy_sd"] == 0.1
    assert record["no_tta"]["accuracy"] == 0.7 and record["no_tta"]["accuracy_sd"] == 0.1
    assert record["tta"]["accuracy"] == 0.78 and record["tta"]["accuracy_sd"] == 0.02  # fold means, not pooled
    assert record["provenance"]["parameters"] == params and record["ablation_of"] is None
    assert record["pooled"]["accuracy"] == 0.75
    assert record["n_test"] == 4 and record["n_train"] == 4
    assert record["train_seconds"] == 4.0 and record["pretrained_used"] is True


# --------------------------------------------------------------------------- targets

def full_record(name, dataset, **kw):
    """A full-profile record as 03_evaluate writes it, config included."""
    config = {"name": name, "dataset": dataset, "cv_folds": 5 if dataset == "bccd" else 0, "val_fraction": 0.1,
              "test_fraction": 0.2, "drop_classes": [], "image_size": 128, "freeze": "none", "tta": False,
              "profile": "full", **kw.pop("config", {})}
    return fake_record(name, dataset=dataset, profile=config["profile"],
                       **{"accuracy_sd": None, "provenance": {"config": config, "tta": config["tta"]}, **kw})


def build_doc(*records, **info):
    return reporting.metrics_document(list(records), **{"profile": "full", "kept": [], "build_seconds": 1800.0,
                                                        "build_finished": True, **info})


def target(rows, experiment, metric):
    return next(r for r in rows if r["experiment"] == experiment and r["metric"] == metric)


def test_targets_table_says_met_not_met_and_not_run():
    doc = build_doc(full_record("bccd", "bccd", accuracy=0.93, accuracy_sd=0.02, macro_f1=0.78,
                                calibration={"test_ece": 0.1}),
                    full_record("kaggle", "kaggle", accuracy=0.92))
    rows = doc["targets"]
    assert [r["experiment"] for r in rows] == [t["experiment"] for t in reporting.TARGETS]
    for row in rows:
        assert set(reporting.TARGET_FIELDS) <= set(row)
    acc = target(rows, "bccd", "accuracy")
    assert (acc["value"], acc["sd"], acc["met"], acc["status"]) == (0.93, 0.02, True, "MET")
    assert acc["published"] == "student 0.714; always-NEUTROPHIL 0.595" and acc["threshold"] == 0.90
    f1 = target(rows, "bccd", "macro_f1")
    assert (f1["value"], f1["met"], f1["status"]) == (0.78, False, "NOT MET")
    assert target(rows, "kaggle", "accuracy")["met"] is True  # exactly the threshold counts as met
    for metric in ("accuracy", "macro_f1"):
        pbc = target(rows, "pbc", metric)
        assert (pbc["value"], pbc["met"], pbc["status"]) == (None, None, "not run")
    build = target(rows, None, "build_seconds")
    assert (build["value"], build["met"], build["status"]) == (1800.0, True, "MET")
    # the records' ECE of 0.1 misses the calibration target (BCCD's: that of the pooled folds)
    for name, metric in (("bccd", "calibration.test_ece"), ("kaggle", "ece")):
        assert target(rows, name, metric)["status"] == "NOT MET"
    not_run = len(reporting.TARGETS) - 6  # pbc's, the cross-lab and counting ones: no record or entry
    assert reporting.targets_summary(rows) == f"3 of {len(reporting.TARGETS)} targets met, 3 not met, {not_run} not assessed or not run."
    over = reporting.BUILD_TIME_LIMIT_SECONDS + 1.0
    assert target(build_doc(build_seconds=over)["targets"], None, "build_seconds")["status"] == "NOT MET"


def test_dotted_targets_read_nested_record_entries():
    record = full_record("pbc-openset", "pbc", config={"drop_classes": ["erythroblast"]},
                         strangers={"pbc-erythroblast": {"auroc": {"knn": 0.93, "energy": 0.6}}})
    row = target(build_doc(record)["targets"], "pbc-openset", "strangers.pbc-erythroblast.auroc.knn")
    assert (row["value"], row["met"]) == (0.93, True)
    from bloodcell_lib.reporting.targets import metric_value

    assert metric_value({"a": {"b": 1}}, "a.c") is None and metric_value({"a.b": 2}, "a.b") == 2


def test_targets_are_not_assessed_for_smoke_partial_or_mismatched_runs():
    smoke = build_doc(full_record("pbc", "pbc", accuracy=0.99, macro_f1=0.99, config={"profile": "smoke"}),
                      profile="smoke", build_seconds=100.0)
    for row in smoke["targets"]:
        assert row["met"] is None, row
        if row["experiment"] in ("pbc", None):
            assert row["status"] == "not assessed (smoke profile)"
    assert target(smoke["targets"], "pbc", "accuracy")["value"] == 0.99  # shown, but not judged
    three_folds = build_doc(full_record("bccd", "bccd", accuracy=0.95, config={"cv_folds": 3}))
    row = target(three_folds["targets"], "bccd", "accuracy")
    assert row["met"] is None and "cv_folds = 5" in row["status"] and "this run: 3" in row["status"]
    partial = build_doc(kept=["pbc"], build_seconds=60.0)
    assert target(partial["targets"], None, "build_seconds")["met"] is None
    assert "partial build" in target(partial["targets"], None, "build_seconds")["status"]
    running = build_doc(build_seconds=600.0, build_finished=False)
    assert target(running["targets"], None, "build_seconds")["status"].startswith("pending")
    too_slow = build_doc(build_seconds=reporting.BUILD_TIME_LIMIT_SECONDS + 300.0,
                         build_finished=False)  # already over: certain
    assert target(too_slow["targets"], None, "build_seconds")["met"] is False
    no_build = reporting.metrics_document([])
    assert target(no_build["targets"], None, "build_seconds")["status"].startswith("not run")


def test_study_data_is_read_from_study_yaml(tmp_path):
    study = load_study()
    assert study["references"] == reporting.REFERENCES and study["targets"] == reporting.TARGETS
    assert reporting.BUILD_TIME_LIMIT_SECONDS == 60 * 60  # issue 16: the whole build may take an hour
    assert target(reporting.TARGETS, None, "build_seconds")["threshold"] == 60 * 60
    assert "60 minutes" in target(reporting.TARGETS, None, "build_seconds")["published"]
    broken = tmp_path / "study.yaml"
    broken.write_text("references: [unclosed")
    with pytest.raises(RuntimeError, match="study.yaml: cannot read the study data"):
        load_study(broken)


def test_targets_frame_and_index_say_it_plainly(tmp_path):
    doc = build_doc(full_record("bccd", "bccd", accuracy=0.93, accuracy_sd=0.02, macro_f1=0.78,
                                calibration={"test_ece": 0.1}))
    frame = reporting.targets_frame(doc["targets"])
    first = frame.iloc[0]
    assert (first["needed"], first["result"], first["status"]) == ("\u2265 0.900", "0.930 \u00b1 0.020", "MET")
    assert frame.iloc[-1]["needed"] == "\u2264 60.0 min" and frame.iloc[-1]["result"] == "30.0 min"
    page, n = reporting.render_index(tmp_path, doc), len(reporting.TARGETS)
    assert "<h2>Targets</h2>" in page and f"2 of {n} targets met, 2 not met, {n - 4} not assessed or not run." in page  # BCCD ECE 0.1: not met
    assert "<tr class='met'>" in page and "<tr class='not-met'>" in page
    assert "<td class='status'>NOT MET</td>" in page and "<td class='status'>not run</td>" in page
    assert page.index("<h2>Targets</h2>") < page.index("<h2>Experiments and published references</h2>")


# --------------------------------------------------------------------------- ablation

THROUGHPUT = {
    "format": "bloodcell-throughput-benchmark", "written": "2026-11-26T00:19:51+00:00",
    "settings": {"dataset": "pbc", "model": "efficientnet_lite0", "image_size": 96, "train_images": 192,
                 "val_images": 96, "epochs": 2},
    "machine": {"processor": "AMD EPYC", "device": "cpu", "cpus_usable": 2},
    "naive": {"epochs": [{"train_pass_seconds": 3.0}, {"train_pass_seconds": 3.0}], "val_acc": 0.77},
    "project": {"epochs": [{"train_pass_seconds": 2.0}, {"train_pass_seconds": 2.5}], "val_acc": 0.74,
                "cache_seconds": 0.5},
    "summary": {"naive_steady_images_per_second": 61.8, "project_steady_images_per_second": 81.5,
                "speedup_steady": 1.32},
}


def ablation_rows(*records, throughput=None, tmp_path=None):
    path = tmp_path / "throughput.json"
    if throughput is not None:
        path.write_text(json.dumps(throughput))
    return reporting.ablation_table({"experiments": list(records)}, throughput=path)


def test_ablation_has_tta_off_and_on_for_each_main_experiment(tmp_path):
    pbc = full_record("pbc", "pbc", no_tta={"accuracy": 0.97, "macro_f1": 0.96},
                      tta={"accuracy": 0.98, "accuracy_sd": None, "macro_f1": 0.975}, train_seconds=120.0)
    rows = ablation_rows(pbc, tmp_path=tmp_path)
    tta = [r for r in rows if r["experiment"] == "pbc"]
    assert [r["setting"] for r in tta] == ["off", "on"]
    assert [r["accuracy"] for r in tta] == [0.97, 0.98] and [r["macro_f1"] for r in tta] == [0.96, 0.975]
    assert "headline" in tta[0]["note"] and "headline" not in tta[1]["note"]  # config tta: false
    assert all(r["factor"] == reporting.TTA_FACTOR and r["train_seconds"] == 120.0 for r in tta)
    for row in rows:
        assert set(reporting.ABLATION_FIELDS) <= set(row)
    old = ablation_rows(full_record("kaggle", "kaggle"), tmp_path=tmp_path)
    assert old[0]["setting"] == "not measured" and "03_evaluate" in old[0]["note"]


def test_ablation_derives_the_changed_settings_from_the_configs(tmp_path):
    parent = full_record("pbc", "pbc", accuracy=0.97, train_seconds=100.0,
                         config={"image_size": 128, "freeze": "none", "title": "main", "output_dir": "/a"})
    variant = full_record("pbc-frozen-96", "pbc", accuracy=0.90, train_seconds=40.0, ablation_of="pbc",
                          config={"image_size": 96, "freeze": "backbone", "title": "variant", "output_dir": "/b",
                                  "threads": 4, "ablation_of": "pbc"})
    assert reporting.changed_settings(variant, parent) == {"image_size": (96, 128), "freeze": ("backbone", "none")}
    rows = [r for r in ablation_rows(parent, variant, tmp_path=tmp_path) if r["factor"] != reporting.TTA_FACTOR]
    pair = [r for r in rows if r["experiment"] in ("pbc", "pbc-frozen-96")]
    assert [r["experiment"] for r in pair] == ["pbc", "pbc-frozen-96"]
    assert pair[0]["factor"] == pair[1]["factor"] == "image_size 96 vs 128; freeze backbone vs none"
    assert pair[0]["setting"] == "image_size 128; freeze none"
    assert pair[1]["setting"] == "image_size 96; freeze backbone"
    assert [r["accuracy"] for r in pair] == [0.97, 0.90] and [r["train_seconds"] for r in pair] == [100.0, 40.0]
    assert pair[1]["note"] == "ablation of pbc"
    # no TTA rows for the ablation itself, and it is marked in the comparison table
    assert not [r for r in ablation_rows(parent, variant, tmp_path=tmp_path)
                if r["experiment"] == "pbc-frozen-96" and r["factor"] == reporting.TTA_FACTOR]
    table = reporting.comparison_table([parent, variant], references=False)
    assert list(table["row"]) == ["experiment", "ablation"] and list(table["ablation of"]) == ["", "pbc"]


def test_ablation_compares_what_was_asked_for_before_the_profile(tmp_path):
    smoke = {"profile": "smoke", "image_size": 64}
    parent = full_record("pbc", "pbc", config=smoke, provenance=None)
    parent["provenance"] = {"config": {**smoke, "name": "pbc"}, "parameters": {"name": "pbc", "image_size": 128}}
    variant = full_record("pbc-96", "pbc", ablation_of="pbc")
    variant["provenance"] = {"config": {**smoke, "name": "pbc-96"},
                             "parameters": {"name": "pbc-96", "image_size": 96, "ablation_of": "pbc"}}
    rows = [r for r in ablation_rows(parent, variant, tmp_path=tmp_path) if r["experiment"] == "pbc-96"]
    assert rows[0]["factor"] == "image_size 96 vs 128"
    assert "both ran with image_size 64" in rows[0]["note"]
    same = full_record("pbc-same", "pbc", ablation_of="pbc")
    row = next(r for r in ablation_rows(full_record("pbc", "pbc"), same, tmp_path=tmp_path)
               if r["experiment"] == "pbc-same")
    assert row["factor"] == "(no setting differs from pbc)"
    orphan = ablation_rows(full_record("x", "pbc", ablation_of="gone"), tmp_path=tmp_path)
    assert orphan[0]["factor"] == "(parent not run)" and "gone" in orphan[0]["note"]


def test_ablation_reads_the_throughput_benchmark(tmp_path):
    rows = [r for r in ablation_rows(throughput=THROUGHPUT, tmp_path=tmp_path)
            if r["factor"] == reporting.TRAINING_PATH_FACTOR]
    assert [r["images_per_second"] for r in rows] == [61.8, 81.5]
    assert [r["accuracy"] for r in rows] == [0.77, 0.74]
    assert rows[0]["setting"].startswith("naive PIL loop") and "cache + tensor augmentation" in rows[1]["setting"]
    assert rows[0]["train_seconds"] == 6.0 and rows[1]["train_seconds"] == 5.0  # cache build charged
    assert "2026-11-26" in rows[0]["note"] and "AMD EPYC" in rows[0]["note"] and "1.32x" in rows[1]["note"]
    missing = reporting.ablation_table({"experiments": []}, throughput=tmp_path / "absent.json")
    assert len(missing) == 1 and missing[0]["setting"] == "not measured"
    assert "benchmarks/throughput.py" in missing[0]["note"]
    frame = reporting.ablation_frame(rows)
    assert list(frame["images/s"]) == ["61.8", "81.5"] and list(frame["accuracy"]) == ["0.770", "0.740"]
    # With the partial freeze, the same path training all layers is its own row.
    frozen = {**THROUGHPUT, "settings": {**THROUGHPUT["settings"], "unfreeze_last": 4},
              "project_all_layers": {"epochs": [{"train_pass_seconds": 2.5}], "val_acc": 0.75, "cache_seconds": 0.5},
              "summary": {**THROUGHPUT["summary"], "project_all_layers_steady_images_per_second": 70.0,
                          "speedup_all_layers_steady": 1.13}}
    rows = [r for r in ablation_rows(throughput=frozen, tmp_path=tmp_path)
            if r["factor"] == reporting.TRAINING_PATH_FACTOR]
    assert [r["images_per_second"] for r in rows] == [61.8, 81.5, 70.0]
    assert "last 4 stages + head trained)" in rows[1]["setting"] and "all layers trained" in rows[2]["setting"]
    adapted = {**frozen, "settings": {**frozen["settings"], "adapt_frozen_bn": True}}
    rows = [r for r in ablation_rows(throughput=adapted, tmp_path=tmp_path)
            if r["factor"] == reporting.TRAINING_PATH_FACTOR]
    assert "last 4 stages + head trained, frozen BN statistics adapted)" in rows[1]["setting"]
    assert rows[2]["train_seconds"] == 3.0 and "1.13x" in rows[2]["note"]


def test_screenshot_renders_a_page(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    page = tmp_path / "page.html"
    page.write_text("<html><body><h1>hello</h1></body></html>")
    out = chromium.screenshot(page, tmp_path / "shot.png", width=400, height=300)
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
        b = chromium.launch_chromium(p)
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
def test_report_pages_show_targets_and_ablation(smoke, browser):
    for path in (smoke.reports / "index.html", smoke.reports / "04_report.html"):
        page, _, _ = open_page(browser, path)
        text = page.inner_text("body")
        page.close()
        assert "Targets" in text and "Ablation" in text, path
        built = {r["name"] for r in reporting.load_metrics(smoke.reports)["experiments"]} | {None}
        expected = sum(t["experiment"] in built for t in reporting.TARGETS)
        # 04_report repeats the leave-one-lab-out targets in its own table, below the full one.
        repeated = 0 if path.name == "index.html" else len(crosslab.lab_target_rows(reporting.TARGETS))
        assert text.count("not assessed (smoke profile)") == expected + repeated, path
        for t in reporting.TARGETS:
            assert t["published"] in text, f"{path}: published numbers of '{t['target']}' missing"
        assert "test-time augmentation" in text and "training path" in text, path


@pytest.mark.slow
@pytest.mark.integration
def test_report_page_compares_with_references(smoke):
    html = (smoke.reports / "04_report.html").read_text()
    for number in ("0.714", "0.85-0.89", "0.963", "0.966", "0.983", "0.989", "0.990", "0.595"):
        assert number in html
    for name in experiment_names():
        assert f'href="{name}/03_evaluate.html"' in html, f"04_report does not link {name}"


def test_index_command_keeps_the_build_facts_and_recomputes_the_rest(tmp_path):
    exp = tmp_path / "pbc"
    exp.mkdir()
    (exp / reporting.RECORD_FILE).write_text(json.dumps(fake_record("pbc", profile="full")))
    old = reporting.metrics_document([], profile="full", build_seconds=1234.5, build_finished=True)
    old["ablation"] = "stale"
    (tmp_path / reporting.METRICS_FILE).write_text(json.dumps(old))
    assert reporting.main([str(tmp_path)]) == 0
    new = json.loads((tmp_path / reporting.METRICS_FILE).read_text())
    assert new["build_seconds"] == 1234.5 and new["profile"] == "full"
    assert [r["name"] for r in new["experiments"]] == ["pbc"] and isinstance(new["ablation"], list)
    assert (tmp_path / reporting.INDEX_FILE).is_file()


def test_split_description_of_a_leave_one_lab_out_run():
    cfg = make_config(dict(name="l", dataset="multi", sources=["pbc", "bccd", "lisc"], test_source="lisc",
                           crop="nucleus", model="resnet18"))
    assert reporting.split_description(cfg) == "lab lisc held out: all of it test; train/val from pbc, bccd"
