"""build/reuse.py: each kind of input changes exactly the keys of the work that reads it
(temporary library, lock, notebooks and data roots; no real file is touched), the reuse
decision, the runner's reuse step with a stand-in for papermill, the build table of
index.html, and one real two-build run of a tiny experiment (the second reuses everything)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from bloodcell_lib.build import reuse, runner
from bloodcell_lib.core import paths

from _smoke_build import ROOT, RUN_ALL, tiny_experiment_env

NOTEBOOKS = ("01_explore", "02_train", "03_evaluate", "04_report", "05_count")
# One file in each named data set's folder (datasets.LAYOUTS) under a temporary data root.
DATA_FILES = {"pbc": "pbc/PBC_dataset_normal_DIB/neutrophil/a.jpg",
              "bccd": "blood-cells/dataset-master/JPEGImages/BloodImage_00001.jpg",
              "kaggle": "blood-cells/dataset2-master/images/TRAIN/EOSINOPHIL/_0_1.jpeg",
              "lisc": "lisc/LISC_crops/eosinophil/1.bmp"}
EXPERIMENTS = {  # bccd starts from pbc's checkpoint and, trained on cell crops, also runs 05_count
    "pbc": {"name": "pbc", "dataset": "pbc", "crop": "none", "lr": 0.002, "init_from": None},
    "bccd": {"name": "bccd", "dataset": "bccd", "crop": "cell", "lr": 0.002, "init_from": "pbc"},
    "kaggle": {"name": "kaggle", "dataset": "kaggle", "crop": "none", "lr": 0.002, "init_from": None},
}


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A library, lock file, notebooks and data root of its own; the data roots point only there."""
    package, notebooks, data = tmp_path / "pkg", tmp_path / "notebooks", tmp_path / "data"
    (package / "templates").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    (package / "templates" / "page.html.j2").write_text("<p>{{ x }}</p>\n")
    notebooks.mkdir()
    for nb in NOTEBOOKS:
        (notebooks / f"{nb}.ipynb").write_text(json.dumps({"cells": [], "name": nb}))
    (tmp_path / "requirements.lock").write_text("torch==2.14.1\n")
    for rel in DATA_FILES.values():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(b"pixels")
    monkeypatch.setenv("BLOODCELL_DATA", str(data))
    monkeypatch.setattr(paths, "RAW_DATA_DIR", tmp_path / "no-raw")
    monkeypatch.setattr(paths, "SHARED_DATA_DIR", tmp_path / "no-shared")
    return SimpleNamespace(root=tmp_path, package=package, notebooks=notebooks, data=data,
                           lock=tmp_path / "requirements.lock",
                           experiments={n: dict(p) for n, p in EXPERIMENTS.items()}, profile="smoke")


def fingerprints(world) -> reuse.Fingerprints:
    return reuse.Fingerprints(package_dir=world.package, lock_path=world.lock, notebooks_dir=world.notebooks)


def plan(world) -> dict[tuple[str, str], str]:
    """(experiment, notebook) -> key of one build of every experiment, 04_report included."""
    fp, keys = fingerprints(world), {}
    for name, params in world.experiments.items():
        params = {**params, "profile": world.profile}
        for work in reuse.experiment_work(fp, name, params, runner.experiment_notebooks(params), keys,
                                          lambda e, nb: None):
            keys[(name, work.notebook)] = work.key
    report = reuse.report_work(fp, "04_report", {"profile": world.profile, "experiments": list(world.experiments)},
                               dict(keys))
    keys[(reuse.REPORT_EXPERIMENT, "04_report")] = report.key
    return keys


def changed_by(world, change) -> set[tuple[str, str]]:
    before = plan(world)
    change()
    after = plan(world)
    assert before.keys() == after.keys()
    return {k for k in before if before[k] != after[k]}


ALL_WORK = {(e, nb) for e in EXPERIMENTS for nb in ("01_explore", "02_train", "03_evaluate")} | {
    ("bccd", "05_count"), (reuse.REPORT_EXPERIMENT, "04_report")}
REPORT = {(reuse.REPORT_EXPERIMENT, "04_report")}


def test_the_plan_is_stable_and_covers_every_notebook(world):
    assert plan(world) == plan(world)
    assert set(plan(world)) == ALL_WORK
    assert len(set(plan(world).values())) == len(ALL_WORK)


def test_config_changes_only_that_experiment_and_the_report(world):
    changed = changed_by(world, lambda: world.experiments["kaggle"].update(lr=0.01))
    assert changed == {("kaggle", nb) for nb in ("01_explore", "02_train", "03_evaluate")} | REPORT


def test_init_from_parent_change_reaches_the_child_training_and_what_reads_it(world):
    changed = changed_by(world, lambda: world.experiments["pbc"].update(lr=0.01))
    assert changed == ({("pbc", nb) for nb in ("01_explore", "02_train", "03_evaluate")}
                       | {("bccd", "02_train"), ("bccd", "03_evaluate"), ("bccd", "05_count")} | REPORT)
    assert ("bccd", "01_explore") not in changed


@pytest.mark.parametrize("edit", ["library", "template", "lock", "profile"])
def test_library_lock_and_profile_change_every_key(world, edit):
    def change():
        if edit == "library":
            (world.package / "a.py").write_text("x = 2\n")
        elif edit == "template":
            (world.package / "templates" / "page.html.j2").write_text("<p>{{ y }}</p>\n")
        elif edit == "lock":
            world.lock.write_text("torch==2.14.2\n")
        else:
            world.profile = "full"
    assert changed_by(world, change) == ALL_WORK


def test_library_cache_files_do_not_count(world):
    cache = world.package / "__pycache__"
    assert changed_by(world, lambda: (cache.mkdir(), (cache / "a.cpython-311.pyc").write_bytes(b"\0"))) == set()


def test_notebook_change_reaches_its_runs_and_what_reads_them(world):
    changed = changed_by(world, lambda: (world.notebooks / "03_evaluate.ipynb").write_text('{"cells": [1]}'))
    assert changed == {(e, "03_evaluate") for e in EXPERIMENTS} | {("bccd", "05_count")} | REPORT
    assert changed_by(world, lambda: (world.notebooks / "04_report.ipynb").write_text("{}")) == REPORT


def test_data_change_reaches_what_reads_that_data_set(world):
    kaggle_file = world.data / DATA_FILES["kaggle"]
    changed = changed_by(world, lambda: kaggle_file.write_bytes(b"other pixels"))
    # kaggle's own notebooks; every 03_evaluate (scores on the other labs); bccd's count reads 03
    assert changed == ({("kaggle", nb) for nb in ("01_explore", "02_train", "03_evaluate")}
                       | {(e, "03_evaluate") for e in EXPERIMENTS} | {("bccd", "05_count")} | REPORT)


def test_data_fingerprint_is_size_and_mtime_not_content(world):
    pbc_file = world.data / DATA_FILES["pbc"]
    stat = pbc_file.stat()
    assert changed_by(world, lambda: os.utime(pbc_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))) == set()
    changed = changed_by(world, lambda: os.utime(pbc_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9)))
    assert ("pbc", "01_explore") in changed and ("bccd", "02_train") in changed  # through init_from
    assert ("bccd", "01_explore") not in changed and ("kaggle", "02_train") not in changed
    new_file = pbc_file.with_name("b.jpg")
    assert ("pbc", "02_train") in changed_by(world, lambda: new_file.write_bytes(b"x"))


def test_multi_source_experiment_reads_each_source(world):
    world.experiments = {"lolo": {"name": "lolo", "dataset": "multi", "sources": ["pbc", "lisc"],
                                  "test_source": "lisc", "init_from": None}}
    changed = changed_by(world, lambda: (world.data / DATA_FILES["lisc"]).write_bytes(b"more pixels"))
    assert ("lolo", "01_explore") in changed
    assert changed_by(world, lambda: (world.data / DATA_FILES["kaggle"]).write_bytes(b"more")) == {
        ("lolo", "03_evaluate")} | REPORT


def test_fingerprints_are_computed_once_per_build(world, monkeypatch):
    fp, calls = fingerprints(world), []
    real = reuse.tree_fingerprint
    monkeypatch.setattr(reuse, "tree_fingerprint", lambda folder: calls.append(folder) or real(folder))
    for name, params in world.experiments.items():
        fp.data({**params, "profile": "smoke"}, "03_evaluate")
    assert len(calls) == len(set(calls)) == len(DATA_FILES)


def test_reason_names_the_changed_inputs(world):
    fp = fingerprints(world)
    params = {**world.experiments["pbc"], "profile": "smoke"}
    old = reuse.experiment_work(fp, "pbc", params, ("01_explore",), {}, lambda e, nb: None)[0]
    new = reuse.experiment_work(fp, "pbc", {**params, "lr": 1.0, "profile": "full"}, ("01_explore",), {},
                                lambda e, nb: None)[0]
    previous = reuse.entry(old, ["01_explore.ipynb", "01_explore.html"], 2.0)
    assert reuse.decide(new, previous, outputs_present=True) == (reuse.RAN, "config, profile")


# --------------------------------------------------------------------------- the decision

def test_decision_reuses_only_when_key_matched_and_outputs_are_there(world, tmp_path):
    fp = fingerprints(world)
    params = {**world.experiments["pbc"], "profile": "smoke"}
    explore, train, evaluate = reuse.experiment_work(fp, "pbc", params, ("01_explore", "02_train", "03_evaluate"),
                                                     {}, lambda e, nb: None)
    live = tmp_path / "live"
    (live / "figures").mkdir(parents=True)
    outputs = ["01_explore.html", "01_explore.ipynb", "figures/0-class-counts.png"]
    for rel in outputs:
        (live / rel).write_text(rel)
    previous = reuse.entry(explore, outputs, 3.5)

    assert reuse.decide(explore, previous, outputs_present=reuse.outputs_present(live, previous, "01_explore")) \
        == (reuse.REUSED, "key matched")
    assert reuse.decide(explore, None, outputs_present=False) == (reuse.RAN, "no previous output")
    explore.forced = True  # --rebuild
    assert reuse.decide(explore, previous, outputs_present=True) == (reuse.RAN, "--rebuild")
    explore.forced = False
    (live / "figures/0-class-counts.png").unlink()
    assert not reuse.outputs_present(live, previous, "01_explore")
    assert reuse.decide(explore, previous, outputs_present=False) == (reuse.RAN, "no previous output")
    # a parent that ran in this build makes its child run, though the child's key is unchanged
    previous = reuse.entry(evaluate, ["03_evaluate.ipynb", "03_evaluate.html"], 1.0)
    assert reuse.decide(evaluate, previous, outputs_present=True)[0] == reuse.REUSED
    assert reuse.decide(evaluate, previous, outputs_present=True, ran={("pbc", "02_train")}) == (
        reuse.RAN, "parent (02_train ran)")


def test_written_files_and_copies_keep_bytes_and_mtime(tmp_path):
    folder, other = tmp_path / "a", tmp_path / "b"
    (folder / "figures").mkdir(parents=True)
    (folder / "old.txt").write_text("old")
    before = reuse.file_states(folder)
    (folder / "figures" / "x.png").write_bytes(b"png")
    (folder / "old.txt").write_text("changed")
    (folder / reuse.KEY_FILE).write_text("{}")
    assert reuse.written(before, reuse.file_states(folder)) == ["figures/x.png", "old.txt"]
    reuse.copy_outputs(folder, other, ["figures/x.png"])
    copied, source = other / "figures" / "x.png", folder / "figures" / "x.png"
    assert copied.read_bytes() == b"png" and copied.stat().st_mtime_ns == source.stat().st_mtime_ns


# --------------------------------------------------------------------------- the runner's step

def fake_execute(calls):
    """Stands in for papermill: writes the executed notebook, its HTML, a figure, the record
    (03_evaluate) and the checkpoint (02_train)."""
    def execute(kernels, source, output, params, *, experiment, cwd, verbose, cell_timeout):
        calls.append((experiment, source.stem))
        output.write_text(f"{source.stem} run {len(calls)}")
        output.with_suffix(".html").write_text(f"<p>{source.stem} run {len(calls)}</p>")
        (cwd / "figures").mkdir(exist_ok=True)
        (cwd / "figures" / f"{source.stem}.png").write_bytes(b"png %d" % len(calls))
        if source.stem == "02_train":
            run = runner.run_dir_of(params)
            run.mkdir(parents=True, exist_ok=True)
            (run / "checkpoint_best.pt").write_bytes(b"weights %d" % len(calls))
        if source.stem == "03_evaluate":
            (cwd / "record.json").write_text(json.dumps({"name": experiment, "provenance": {"created": len(calls)}}))
        return 1.5
    return execute


def one_build(world, monkeypatch, live: Path, calls: list, *rebuild: str) -> list[reuse.Work]:
    monkeypatch.setattr(runner, "execute_notebook", fake_execute(calls))
    args = SimpleNamespace(rebuild=list(rebuild), profile="smoke", verbose=False, cell_timeout=None, kernel="shared",
                           command="run_all.sh --profile smoke", only=[])
    params_of = {n: {**p, "profile": "smoke", "output_dir": str(world.root / "runs" / "smoke")}
                 for n, p in world.experiments.items()}
    steps = runner._Step(args, live, kernels=None, params_of=params_of)
    steps.fp = fingerprints(world)
    steps.progress = runner.Progress(steps.plan(list(params_of)))
    staging = live.parent / "staging"
    works = []
    for name in params_of:
        out = staging / name
        out.mkdir(parents=True)
        done = steps.experiment(name, out, "(test)")
        runner._finish_record(out, name, done, args)
        works += done
    works.append(steps.report(staging, list(params_of)))
    one_build.table = steps.table(works)
    if live.exists():
        shutil.rmtree(live)
    staging.rename(live)
    return works


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_second_build_reuses_everything_byte_for_byte(world, monkeypatch, tmp_path):
    live, calls = tmp_path / "reports", []
    first = one_build(world, monkeypatch, live, calls)
    assert {(w.status, w.reason) for w in first} == {(reuse.RAN, "no previous output")}
    assert len(calls) == len(ALL_WORK)
    assert (tmp_path / "runs" / "smoke" / "pbc" / reuse.KEY_FILE).is_file()
    snapshot = tree(live)

    second = one_build(world, monkeypatch, live, calls)
    assert {(w.status, w.reason) for w in second} == {(reuse.REUSED, "key matched")}
    assert len(calls) == len(ALL_WORK), "nothing ran a second time"
    assert tree(live) == snapshot
    record = json.loads((live / "bccd" / "record.json").read_text())
    assert record["notebook_seconds"] == {nb: 1.5 for nb in ("01_explore", "02_train", "03_evaluate", "05_count")}


def test_rebuild_and_changes_run_what_they_reach(world, monkeypatch, tmp_path):
    live, calls = tmp_path / "reports", []
    one_build(world, monkeypatch, live, calls)
    ran = lambda works: {(w.experiment, w.notebook) for w in works if w.status == reuse.RAN}  # noqa: E731

    works = one_build(world, monkeypatch, live, calls, "pbc")  # --rebuild pbc: its child bccd trains again too
    assert ran(works) == ({("pbc", nb) for nb in ("01_explore", "02_train", "03_evaluate")}
                          | {("bccd", "02_train"), ("bccd", "03_evaluate"), ("bccd", "05_count")} | REPORT)
    reasons = {(w.experiment, w.notebook): w.reason for w in works}
    assert reasons[("pbc", "02_train")] == "--rebuild"
    assert reasons[("bccd", "02_train")] == "parent (pbc/02_train ran)"

    world.experiments["kaggle"]["lr"] = 0.5
    works = one_build(world, monkeypatch, live, calls)
    assert ran(works) == {("kaggle", nb) for nb in ("01_explore", "02_train", "03_evaluate")} | REPORT
    assert [w.reason for w in works if w.experiment == "kaggle"] == ["config", "config", "config, parent"]

    # a checkpoint gone from the run folder (or trained by a build that failed later) is trained again
    (tmp_path / "runs" / "smoke" / "kaggle" / "checkpoint_best.pt").unlink()
    works = one_build(world, monkeypatch, live, calls)
    assert ran(works) == {("kaggle", "02_train"), ("kaggle", "03_evaluate")} | REPORT
    (tmp_path / "runs" / "smoke" / "kaggle" / reuse.KEY_FILE).unlink()
    assert ("kaggle", "02_train") in ran(one_build(world, monkeypatch, live, calls))


def test_progress_lines_count_the_notebooks_and_estimate_from_the_last_build(world, monkeypatch, tmp_path, capsys):
    live, calls = tmp_path / "reports", []
    one_build(world, monkeypatch, live, calls)
    out = capsys.readouterr().out
    total = len(ALL_WORK)
    assert f"1/{total} pbc 01_explore: started (runs: no previous output); build elapsed 0.0 min, " \
           "no estimate (no earlier build)" in out
    assert f"{total}/{total} (all) 04_report: started" in out
    assert one_build.table["cold"] is True

    world.experiments["kaggle"]["lr"] = 0.5  # kaggle and the report run again, the rest is reused
    one_build(world, monkeypatch, live, calls)
    out = capsys.readouterr().out
    assert re.search(rf"\d+/{total} kaggle 02_train: started \(runs: config\); build elapsed \d+\.\d min, "
                     r"under a minute left \(from the last build's timings\)", out)
    assert re.search(rf"1/{total} pbc 01_explore: reused \(key matched; ran in 1.5 s then\)", out)
    table = one_build.table
    assert table["cold"] is False and table["reused"] == total - 4


def test_the_plan_foresees_what_runs_and_the_estimate_sums_its_last_seconds(world, monkeypatch, tmp_path):
    from bloodcell_lib.build.progress import Planned, minutes_left

    live = tmp_path / "reports"
    one_build(world, monkeypatch, live, [])
    world.experiments["pbc"]["lr"] = 0.5
    args = SimpleNamespace(rebuild=[], profile="smoke", only=[])
    params_of = {n: {**p, "profile": "smoke", "output_dir": str(world.root / "runs" / "smoke")}
                 for n, p in world.experiments.items()}
    steps = runner._Step(args, live, kernels=None, params_of=params_of)
    steps.fp = fingerprints(world)
    plan = steps.plan(list(params_of))
    runs = {(p.experiment, p.notebook) for p in plan if p.runs}
    # pbc's change reaches bccd's training (init_from) and what reads it, and the report
    assert runs == ({("pbc", nb) for nb in ("01_explore", "02_train", "03_evaluate")}
                    | {("bccd", "02_train"), ("bccd", "03_evaluate"), ("bccd", "05_count")} | REPORT)
    assert {p.last_seconds for p in plan} == {1.5}
    # a full build's estimate is not made from a smoke build's seconds
    steps.args.profile = "full"
    assert all(p.last_seconds is None for p in steps.plan(list(params_of)))

    timed = [Planned("a", "02_train", True, 1200.0), Planned("a", "03_evaluate", False, 900.0),
             Planned("b", "02_train", True, 660.0), Planned("b", "03_evaluate", True, None)]
    assert minutes_left(timed) == ("about 31 min left (from the last build's timings; 1 notebook(s) never timed, "
                                   "not counted)")
    assert minutes_left(timed[3:]) == "no estimate (no earlier build)"


def test_a_warm_or_partial_build_does_not_measure_the_build_time_target():
    from bloodcell_lib.reporting.targets import targets_table

    rows = [{"experiment": "pbc", "notebook": nb, "status": "reused" if nb == "01_explore" else "ran"}
            for nb in ("01_explore", "02_train", "03_evaluate")]
    document = {"profile": "full", "build_seconds": 1200.0, "experiments": [],
                "build": {"notebooks": rows, "reused": 1, "ran": 2, "cold": False}}
    whole = next(r for r in targets_table(document) if r["experiment"] is None)
    assert (whole["met"], whole["status"]) == (None, "not measured: 1 of 3 notebooks reused")
    document["build"].update(reused=0, ran=3)
    document["kept"] = ["kaggle"]  # --only pbc
    whole = next(r for r in targets_table(document) if r["experiment"] is None)
    assert whole["status"] == "not measured: 0 of 3 notebooks reused; 1 experiment(s) kept from earlier (--only)"
    document["build"]["cold"], document["kept"] = True, []
    assert next(r for r in targets_table(document) if r["experiment"] is None)["status"] == "MET"


def test_index_shows_the_build_table(tmp_path):
    from bloodcell_lib.reporting import index

    rows = [{"experiment": "pbc", "notebook": "01_explore", "status": "reused", "reason": "key matched",
             "seconds": 0.01, "run_seconds": 12.0},
            {"experiment": "pbc", "notebook": "02_train", "status": "ran", "reason": "config, data",
             "seconds": 95.25, "run_seconds": 95.25},
            {"experiment": "(all)", "notebook": "04_report", "status": "ran", "reason": "parent (pbc/02_train ran)",
             "seconds": 8.0, "run_seconds": 8.0}]
    table = index._build_table({"build": {"notebooks": rows}})
    texts = [[c["text"] for c in row["cells"]] for row in table["rows"]]
    assert texts[1] == ["pbc", "02_train", "ran", "config, data", "95.2", "95.2"]
    assert texts[2] == ["pbc", "total", "", "", "95.3", "107.2"]
    assert index._build_table({}) is None
    template = (Path(index.TEMPLATES_DIR) / "index.html.j2").read_text()
    assert "Build: what reran and why" in template


# --------------------------------------------------------------------------- run_all.sh twice

@pytest.mark.slow
@pytest.mark.integration
def test_run_all_twice_reuses_every_notebook_of_a_tiny_experiment(tmp_path):
    """A real build of one tiny experiment, then the same build again: every notebook reused,
    the reports byte for byte the same; --rebuild runs them again."""
    env = tiny_experiment_env(tmp_path, "tiny", epochs=1, settings="tta: false\n", per_class=6, size=32)
    reports = tmp_path / "reports"

    def build(*args):
        proc = subprocess.run([str(RUN_ALL), "--kernel", "shared", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout, json.loads((reports / "metrics.json").read_text())["build"]

    out, first = build()
    assert {r["status"] for r in first["notebooks"]} == {"ran"}
    reports_before = {k: v for k, v in tree(reports).items() if k.endswith((".ipynb", ".html", ".png", ".json"))
                      and k not in ("metrics.json", "index.html")}
    out, second = build()
    assert [(r["notebook"], r["status"], r["reason"]) for r in second["notebooks"]] == [
        (nb, "reused", "key matched") for nb in ("01_explore", "02_train", "03_evaluate", "04_report")], out
    assert "tiny 02_train: reused (key matched" in out
    after = tree(reports)
    assert {k: after[k] for k in reports_before} == reports_before
    assert "Build: what reran and why" in (reports / "index.html").read_text()
    out, third = build("--rebuild", "tiny")
    assert [(r["notebook"], r["reason"]) for r in third["notebooks"]] == [
        ("01_explore", "--rebuild"), ("02_train", "--rebuild"), ("03_evaluate", "--rebuild"),
        ("04_report", "parent (tiny/01_explore, tiny/02_train, tiny/03_evaluate ran)")]
