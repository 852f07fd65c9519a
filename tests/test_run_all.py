"""runner.py (what run_all.sh runs): experiment discovery, the lock and the atomic swap (fast, no
kernel); then run_all.sh end to end: the smoke build, a failing notebook, two builds at once,
--only.

One real ``./run_all.sh --profile smoke`` build is shared by this module and
test_reporting.py (tests/_smoke_build.py); the other builds here fail within seconds on
purpose or rebuild a single experiment.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from bloodcell_lib.training.config import TrainConfig
from bloodcell_lib.build import runner

from _smoke_build import ROOT, RUN_ALL, build_env, experiment_names, run_all, smoke_build, tiny_experiment_env

NOTEBOOKS = ("01_explore", "02_train", "03_evaluate")
SCORES = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc_ovr", "ece")


def slow(test):
    """A test that runs run_all.sh (the smoke build, or a build that fails on purpose)."""
    return pytest.mark.slow(pytest.mark.integration(test))


# =========================================================================== fast: no kernel

def test_discover_experiments_checks_keys_and_names(tmp_path, monkeypatch):
    (tmp_path / "ok.yaml").write_text("dataset: pbc\n")
    monkeypatch.setenv("BLOODCELL_EXPERIMENTS", str(tmp_path))
    params = runner.discover_experiments()["ok"]["params"]
    # Every field is passed: what the file leaves out is TrainConfig's default, never the
    # notebook's example default (weight_decay 0.0001 in the notebooks, 0.0 in TrainConfig).
    assert params == {**TrainConfig().to_dict(), "dataset": "pbc", "name": "ok"}
    assert params["weight_decay"] == 0.0
    (tmp_path / "mismatch.yaml").write_text("name: other\n")
    with pytest.raises(runner.RunAllError, match="must equal the file name"):
        runner.discover_experiments()
    (tmp_path / "mismatch.yaml").unlink()
    (tmp_path / "prof.yaml").write_text("profile: smoke\n")
    with pytest.raises(runner.RunAllError, match="run_all.sh --profile"):
        runner.discover_experiments()


def test_experiments_run_after_the_one_they_start_from(tmp_path, monkeypatch):
    (tmp_path / "a.yaml").write_text("init_from: c\n")
    (tmp_path / "b.yaml").write_text("dataset: pbc\n")
    (tmp_path / "c.yaml").write_text("init_from: elsewhere.pt\n")
    monkeypatch.setenv("BLOODCELL_EXPERIMENTS", str(tmp_path))
    assert list(runner.discover_experiments()) == ["c", "a", "b"]
    (tmp_path / "c.yaml").write_text("init_from: a\n")
    with pytest.raises(runner.RunAllError, match="in a circle.*a -> c -> a"):
        runner.discover_experiments()


def test_project_experiments_are_valid():
    from bloodcell_lib.training.config import make_config as mk

    found = runner.discover_experiments([runner.EXPERIMENTS_DIR])
    assert {"seed-replica", "bccd", "kaggle", "pbc"} <= set(found)
    for name, exp in found.items():
        for profile in ("full", "smoke"):
            mk({**exp["params"], "profile": profile})  # raises ConfigError on a bad value
    seed = found["seed-replica"]["params"]
    assert (seed["dataset"], seed["crop"], seed["model"], seed["optimizer"], seed["lr"], seed["epochs"],
            seed["balanced_sampling"], seed["image_size"], seed["pretrained"], seed["allow_random_init"]) == \
        ("bccd", "none", "resnet34", "adam", 0.01, 15, True, 224, True, True)
    assert found["bccd"]["params"]["crop"] == "cell" and found["bccd"]["params"]["cv_folds"] == 5


MAIN_EXPERIMENTS = {"pbc", "kaggle", "bccd", "general", "lolo-pbc", "lolo-bccd", "lolo-lisc", "lolo-krd"}


def test_the_full_profile_runs_the_main_experiments_and_complete_adds_the_ablations():
    found = runner.discover_experiments([runner.EXPERIMENTS_DIR])
    selected, left_out = runner.select_experiments(found, "full")
    assert set(selected) == MAIN_EXPERIMENTS & set(found)
    assert set(left_out) == set(found) - MAIN_EXPERIMENTS
    assert all(why == runner.ABLATION_LEFT_OUT for why in left_out.values())
    assert "--profile complete" in runner.ABLATION_LEFT_OUT and "60 minutes" in runner.ABLATION_LEFT_OUT
    for profile in ("complete", "smoke"):
        assert runner.select_experiments(found, profile) == (list(found), {})
    # --only runs what it names, an ablation too; the profile still says why the others are out
    selected, left_out = runner.select_experiments(found, "full", ["pbc-96px", "pbc"])
    assert selected == [n for n in found if n in ("pbc", "pbc-96px")] and "pbc-96px" not in left_out
    assert runner.resolved_params(found["pbc"], "complete")["profile"] == "full"


def test_a_main_experiment_cannot_start_from_an_ablation(tmp_path, monkeypatch):
    (tmp_path / "a.yaml").write_text("dataset: pbc\nbuild: ablation\n")
    (tmp_path / "b.yaml").write_text("dataset: bccd\ninit_from: a\n")
    monkeypatch.setenv("BLOODCELL_EXPERIMENTS", str(tmp_path))
    found = runner.discover_experiments()
    with pytest.raises(runner.RunAllError, match="main experiment cannot start from the ablation 'a'"):
        runner.select_experiments(found, "full")


def test_left_out_experiments_are_labelled_in_targets_ablation_and_index(tmp_path):
    """An ablation the full build left out: its earlier record is shown with the commit it came
    from, never as this build's number; without a record, the target and ablation rows say why."""
    from bloodcell_lib.reporting.document import metrics_document
    from bloodcell_lib.reporting.index import render_index

    old = {"name": "pbc-openset", "ablation_of": None, "accuracy": 0.97, "profile": "full",
           "strangers": {"pbc-erythroblast": {"auroc": {"knn": 0.95}}},
           "provenance": {"git": {"commit": "abcdef1234567", "dirty": False}, "created": "2026-12-02T10:00:00+00:00",
                          "config": {"drop_classes": ["erythroblast"]}}}
    left_out = {"pbc-openset": runner.ABLATION_LEFT_OUT, "pbc-96px": runner.ABLATION_LEFT_OUT}
    document = metrics_document([old], profile="full", left_out=left_out, build_seconds=3000.0,
                                build={"notebooks": [], "ran": 0, "reused": 0, "cold": True})
    targets = {t["experiment"]: t for t in document["targets"]}
    openset = targets["pbc-openset"]
    assert openset["met"] is None and openset["value"] == 0.95
    assert openset["status"].startswith("not assessed: ablation, left out of the default full build")
    assert "commit abcdef1 of 2026-12-02" in openset["status"]
    notes = {r["experiment"]: r["note"] for r in document["ablation"]}
    assert "commit abcdef1" in notes["pbc-openset"]
    assert notes["pbc-96px"] == runner.ABLATION_LEFT_OUT + " (no earlier record)"
    html = render_index(tmp_path, document)
    assert "Left out of this build" in html and "pbc-96px" in html and "commit abcdef1 of 2026-12-02" in html
    whole = next(t for t in document["targets"] if t["experiment"] is None)
    assert whole["status"] == "MET"


def test_lock_refuses_a_second_holder(tmp_path):
    first, second = runner.BuildLock(tmp_path / "r"), runner.BuildLock(tmp_path / "r")
    first.acquire(wait=False)
    try:
        with pytest.raises(runner.LockBusy, match=f"PID {os.getpid()}"):
            second.acquire(wait=False)
    finally:
        first.release()
    second.acquire(wait=False)
    second.release()


def test_holder_waits_for_details_written_just_after_the_lock(tmp_path):
    # The race CI hit: the second build reads the lock file between the first one's flock and
    # its write of the details, and must still name the holder.
    import threading

    lock = runner.BuildLock(tmp_path / "r")
    lock.live.mkdir()
    lock.path.write_text("")
    writer = threading.Timer(0.3, lambda: lock.path.write_text(json.dumps({"pid": 4242, "started": "now"})))
    writer.start()
    try:
        assert "PID 4242" in lock.holder()
    finally:
        writer.join()
    lock.path.write_text("")
    assert lock.holder(patience_s=0.1) == "another run_all.sh (holder unknown)"


def test_swap_in_replaces_the_whole_folder_and_keeps_the_lock_inode(tmp_path):
    live, staging = tmp_path / "reports", tmp_path / ".reports.staging-1"
    live.mkdir()
    (live / "old.txt").write_text("old")
    (live / ".lock").write_text("")
    staging.mkdir()
    (staging / "new.txt").write_text("new")
    os.link(live / ".lock", staging / ".lock")
    inode = (live / ".lock").stat().st_ino
    runner.swap_in(staging, live)
    assert sorted(p.name for p in live.iterdir()) == [".lock", "new.txt"]
    assert (live / ".lock").stat().st_ino == inode
    assert not staging.exists()


# =========================================================================== run_all.sh


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
    build = smoke_build(tmp_path_factory)
    if build.returncode != 0:
        pytest.fail(f"./run_all.sh --profile smoke failed (exit {build.returncode}):\n"
                    f"{build.stdout[-4000:]}\n{build.stderr[-4000:]}")
    return build


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Relative path -> (sha256, mtime_ns) of every file under ``folder`` (not the lock file,
    which every build, failed or refused, opens and stamps with its PID)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != ".lock":
            out[str(path.relative_to(folder))] = (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
    return out


def broken_experiments(tmp_path: Path) -> Path:
    """An extra experiments folder with one experiment whose parameter value is invalid."""
    extra = tmp_path / "extra_experiments"
    extra.mkdir()
    (extra / "broken.yaml").write_text("title: deliberately broken\ndataset: pbc\nmodel: no-such-model\n")
    return extra


# --------------------------------------------------------------------------- the smoke build

@slow
def test_smoke_build_writes_every_report(smoke):
    reports = smoke.reports
    assert (reports / "index.html").is_file()
    assert (reports / "04_report.html").is_file() and (reports / "04_report.ipynb").is_file()
    assert (reports / "README.md").is_file(), "the reports README is carried into every build"
    for name in experiment_names():
        for nb in NOTEBOOKS:
            assert (reports / name / f"{nb}.ipynb").is_file(), f"{name}/{nb}.ipynb missing"
            html = (reports / name / f"{nb}.html").read_text()
            # --no-input: code cells hidden
            assert "notebook_display.notebook_config(globals())" not in html, f"{name}/{nb}.html shows code"
            assert "\r" not in html
    # nothing half-built left beside the reports
    leftovers = [p.name for p in reports.parent.iterdir() if ".staging-" in p.name or ".old-" in p.name]
    assert not leftovers
    assert not (reports.parent / "reports.failed").exists()


@slow
def test_smoke_build_reports_progress(smoke):
    for name in experiment_names():
        for nb in NOTEBOOKS:
            assert re.search(rf"\d+/\d+ {re.escape(name)} {nb}: started \(runs: ", smoke.stdout), \
                f"no progress line for {name} {nb}"
    assert re.search(r"\d+/\d+ \(all\) 04_report: started", smoke.stdout)
    # Its duration is a benchmark figure, not a test: the project's standards keep timings out of tests.


@slow
def test_metrics_json_has_one_complete_record_per_experiment(smoke):
    doc = json.loads((smoke.reports / "metrics.json").read_text())
    records = {r["name"]: r for r in doc["experiments"]}
    assert sorted(records) == experiment_names()
    for name, r in records.items():
        for field in ("dataset", "split", "model", "image_size", "epochs", "n_train", "n_val", "n_test",
                      "accuracy", "balanced_accuracy", "macro_f1", "per_class_f1", "roc_auc_ovr", "ece",
                      "train_seconds", "total_seconds", "profile", "pretrained_used", "provenance"):
            assert field in r, f"{name}: no {field}"
        for key in SCORES:
            value = r[key]
            if key == "roc_auc_ovr" and value is None:
                continue  # undefined when a class is absent from a tiny test split
            assert isinstance(value, float) and 0.0 <= value <= 1.0, f"{name}: {key} = {value!r}"
        assert r["per_class_f1"], name
        assert all(v is None or 0.0 <= v <= 1.0 for v in r["per_class_f1"].values()), name
        assert r["profile"] == "smoke" and r["epochs"] == 1
        assert isinstance(r["pretrained_used"], bool)
        assert r["n_train"] > 0 and r["n_test"] > 0
        assert r["train_seconds"] > 0 and r["total_seconds"] >= r["train_seconds"]
        prov = r["provenance"]
        for key in ("config", "seed", "split_sha256", "packages", "machine", "run_dir"):
            assert key in prov, f"{name}: provenance lacks {key}"
        # smoke runs never land in the full study's run folders
        assert Path(prov["run_dir"]).parent == smoke.runs / "smoke"
    assert [ref["accuracy"] for ref in doc["references"] if "Student" in ref["label"]] == [0.714]


@slow
def test_metrics_json_has_targets_ablation_and_build_time(smoke):
    doc = json.loads((smoke.reports / "metrics.json").read_text())
    assert doc["build_finished"] is True and 0 < doc["build_seconds"] <= smoke.seconds
    built = {r["name"] for r in doc["experiments"]} | {None}
    assert {"bccd", "kaggle", "pbc", None} <= {r["experiment"] for r in doc["targets"]}
    for row in doc["targets"]:  # the cross-lab targets' experiments (lolo-*, general) may not be in the build
        status = "not assessed (smoke profile)" if row["experiment"] in built else "not run"
        assert row["met"] is None and row["status"] == status, row
    assert next(r for r in doc["targets"] if r["experiment"] is None)["value"] == doc["build_seconds"]
    for r in doc["experiments"]:
        for key in ("no_tta", "tta"):
            assert 0.0 <= r[key]["accuracy"] <= 1.0 and 0.0 <= r[key]["macro_f1"] <= 1.0, (r["name"], key)
        headline = r["tta"] if r["provenance"]["config"]["tta"] else r["no_tta"]
        assert r["accuracy"] == headline["accuracy"], r["name"]
        assert r["provenance"]["parameters"]["name"] == r["name"]
        tta_rows = [a for a in doc["ablation"] if a["experiment"] == r["name"] and a["factor"].startswith("test-time")]
        if not r.get("ablation_of"):
            assert [a["setting"] for a in tta_rows] == ["off", "on"], r["name"]
            assert [a["accuracy"] for a in tta_rows] == [r["no_tta"]["accuracy"], r["tta"]["accuracy"]]
    assert [a for a in doc["ablation"] if a["factor"].startswith("training path")]
    pbc_run = smoke.runs / "smoke" / "pbc"  # both evaluations kept, side by side
    assert json.loads((pbc_run / "metrics_test_tta.json").read_text())["tta"] is True
    assert json.loads((pbc_run / "metrics_test.json").read_text())["tta"] is False


@slow
def test_seed_replica_states_random_init_in_bold(smoke):
    record = json.loads((smoke.reports / "seed-replica" / "record.json").read_text())
    if record["pretrained_used"]:
        pytest.skip("ImageNet weights for resnet34 are available here; nothing to state")
    train_html = (smoke.reports / "seed-replica" / "02_train.html").read_text()
    assert "<strong>Trained from random initialisation" in train_html
    assert "<strong>Trained from random initialisation" in (smoke.reports / "seed-replica" / "03_evaluate.html").read_text()
    index = (smoke.reports / "index.html").read_text()
    assert "<b>seed-replica: Trained from random initialisation" in index


@slow
def test_progress_bars_render_as_their_last_state(smoke):
    """Plain tqdm in a static HTML report: each bar shows once (its final state), not once per
    update, and the per-epoch log line is there."""
    for name in experiment_names():
        for nb in NOTEBOOKS:
            html = (smoke.reports / name / f"{nb}.html").read_text()
            for block in re.findall(r"<pre>(.*?)</pre>", html, flags=re.S):
                bars: dict[str, list[int]] = {}
                for line in block.splitlines():
                    found = re.search(r"(\d+)%\|", line)
                    if found:
                        bars.setdefault(line.split(":")[0], []).append(int(found.group(1)))
                for desc, states in bars.items():
                    # a bar may run several times (one per fold), but each run shows once: only
                    # finished states, except possibly the very last
                    assert all(p == 100 for p in states[:-1]), f"{name}/{nb}: intermediate states of {desc}: {states}"
        assert "epoch 1/1" in (smoke.reports / name / "02_train.html").read_text()


# --------------------------------------------------------------------------- failure

@slow
def test_failing_notebook_names_it_and_keeps_the_last_good_reports(smoke, tmp_path):
    before = snapshot(smoke.reports)
    extra = broken_experiments(tmp_path)
    env = smoke.env(BLOODCELL_EXPERIMENTS=f"{ROOT / 'experiments'}:{extra}")
    proc = run_all("--profile", "smoke", "--only", "broken", "--kernel", "fresh", env=env, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = proc.stderr
    assert "experiment 'broken'" in err and "01_explore.ipynb" in err
    assert "ConfigError" in err and "no-such-model" in err
    failed = smoke.reports.parent / "reports.failed" / "broken" / "01_explore.ipynb"
    assert f"executed notebook: {failed}" in err
    assert failed.is_file() and failed.with_suffix(".html").is_file()
    assert "no-such-model" in failed.read_text()
    assert snapshot(smoke.reports) == before, "a failed build changed the last good reports"


@slow
def test_bad_experiment_file_is_refused_before_running(smoke, tmp_path):
    extra = tmp_path / "bad"
    extra.mkdir()
    (extra / "typo.yaml").write_text("dataset: pbc\nlearning_rate: 0.1\n")
    env = smoke.env(BLOODCELL_EXPERIMENTS=str(extra))
    proc = run_all("--profile", "smoke", env=env, timeout=120)
    assert proc.returncode == 2
    assert "typo.yaml" in proc.stderr and "learning_rate" in proc.stderr


@slow
def test_unknown_only_name_is_refused(smoke):
    proc = run_all("--profile", "smoke", "--only", "nope", env=smoke.env(), timeout=120)
    assert proc.returncode == 2 and "nope" in proc.stderr and "seed-replica" in proc.stderr


# --------------------------------------------------------------------------- concurrency

@slow
def test_second_build_refuses_while_the_lock_is_held(tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    with open(reports / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.write(json.dumps({"pid": 424242, "started": "now", "command": "run_all.sh (test)"}))
        handle.flush()
        proc = run_all("--profile", "smoke", env=build_env(reports, tmp_path / "runs", tmp_path / "cache"),
                       timeout=120)
    assert proc.returncode == 75, proc.stdout + proc.stderr
    assert "another build" in proc.stderr and "PID 424242" in proc.stderr and "--wait" in proc.stderr
    assert sorted(p.name for p in reports.iterdir()) == [".lock"]


@slow
def test_wait_queues_behind_the_holder(tmp_path):
    reports = tmp_path / "reports"
    reports.mkdir()
    extra = broken_experiments(tmp_path)
    env = build_env(reports, tmp_path / "runs", tmp_path / "cache",
                    BLOODCELL_EXPERIMENTS=str(extra))
    handle = open(reports / ".lock", "w")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    proc = subprocess.Popen([str(RUN_ALL), "--profile", "smoke", "--wait"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(8)
        assert proc.poll() is None, "run_all.sh --wait did not wait for the lock"
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
    out, err = proc.communicate(timeout=300)
    assert "waiting" in out
    assert proc.returncode == 1 and "experiment 'broken'" in err  # it ran once the lock was free


@slow
def test_two_builds_at_once_one_refuses(tmp_path):
    reports = tmp_path / "reports"
    extra = broken_experiments(tmp_path)
    env = build_env(reports, tmp_path / "runs", tmp_path / "cache", BLOODCELL_EXPERIMENTS=str(extra))
    procs = [subprocess.Popen([str(RUN_ALL), "--profile", "smoke", "--kernel", "fresh"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [1, 75], results
    refused = next(err for code, _, err in results if code == 75)
    ran_pid = next(p.pid for p, (code, _, _) in zip(procs, results) if code == 1)
    assert f"PID {ran_pid}" in refused
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]


# --------------------------------------------------------------------------- reuse

@slow
def test_second_build_with_nothing_changed_reuses_every_notebook(smoke, tmp_path):
    """Nothing changed since the smoke build: every notebook, 04_report too, is copied from the
    last build instead of run, and every report is byte for byte the one before."""
    reports = tmp_path / "reports"
    shutil.copytree(smoke.reports, reports, symlinks=True)
    reports_only = lambda snap: {k: sha for k, (sha, _) in snap.items()  # noqa: E731
                                 if k.endswith((".ipynb", ".html", ".png")) and k != "index.html"}
    before = reports_only(snapshot(reports))
    proc = run_all("--profile", "smoke", env=build_env(reports, smoke.runs, smoke.cache), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((reports / "metrics.json").read_text())["build"]["notebooks"]
    assert {(r["status"], r["reason"]) for r in rows} == {("reused", "key matched")}, proc.stdout
    assert {r["experiment"] for r in rows} == {*experiment_names(), "(all)"}
    assert reports_only(snapshot(reports)) == before
    assert "Build: what reran and why" in (reports / "index.html").read_text()


# --------------------------------------------------------------------------- --only

@slow
def test_only_rebuilds_one_experiment_and_keeps_the_others(smoke, tmp_path):
    reports = tmp_path / "reports"
    shutil.copytree(smoke.reports, reports, symlinks=True)
    names = experiment_names()
    records = json.loads((reports / "metrics.json").read_text())["experiments"]
    target = min(records, key=lambda r: r["total_seconds"])["name"]  # the quickest to rebuild
    others = {n: snapshot(reports / n) for n in names if n != target}
    old_record = json.loads((reports / target / "record.json").read_text())
    proc = run_all("--profile", "smoke", "--only", target, "--rebuild", target,
                   env=build_env(reports, smoke.runs, smoke.cache), timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name, snap in others.items():
        assert snapshot(reports / name) == snap, f"--only {target} touched {name}"
    new_record = json.loads((reports / target / "record.json").read_text())
    assert new_record["provenance"]["created"] != old_record["provenance"]["created"]
    doc = json.loads((reports / "metrics.json").read_text())
    assert sorted(r["name"] for r in doc["experiments"]) == names
    kept = re.search(r"; keeping (.*)$", proc.stdout, re.MULTILINE)
    assert kept and sorted(kept.group(1).split(", ")) == [n for n in names if n != target], proc.stdout
    assert math.isfinite(new_record["accuracy"])


# --------------------------------------------------------------------------- interruption

def _kernel_pids() -> set[int]:
    found = subprocess.run(["pgrep", "-f", "ipykernel_launcher"], capture_output=True, text=True).stdout
    return {int(pid) for pid in found.split()}


@slow
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_a_long_training_cell_and_its_kernel(tmp_path, signal_name):
    """Kernels run in their own session, so the signal reaches run_all.sh only: it must kill the
    kernel (the training cell would otherwise run on for hours) and leave the reports as they were."""
    import signal

    env = tiny_experiment_env(tmp_path, "endless", epochs=100000)
    reports = tmp_path / "reports"
    before = _kernel_pids()
    proc = subprocess.Popen([str(RUN_ALL), "--kernel", "fresh"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        runs_dir = tmp_path / "runs" / "endless"
        deadline = time.time() + 240
        while not (runs_dir / "history.csv").is_file():  # training is under way
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else "slow"
            time.sleep(0.5)
        os.kill(proc.pid, getattr(signal, signal_name))
        started = time.time()
        out, _ = proc.communicate(timeout=60)
        stopped_after = time.time() - started
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    assert "interrupted" in out and stopped_after < 30, (stopped_after, out)
    time.sleep(1)
    assert not (_kernel_pids() - before), "the training kernel outlived run_all.sh"
    assert not reports.exists() or sorted(p.name for p in reports.iterdir()) == [".lock"]
    assert not [p for p in tmp_path.iterdir() if ".staging-" in p.name]


def test_count_notebook_runs_for_bccd_experiments_only():
    from bloodcell_lib.build.runner import experiment_notebooks

    assert experiment_notebooks({"dataset": "bccd"}) == ("01_explore", "02_train", "03_evaluate", "05_count")
    assert "05_count" not in experiment_notebooks({"dataset": "pbc"})
    assert "05_count" not in experiment_notebooks({"dataset": "bccd", "crop": "none"})  # the whole-field seed replica
    assert "05_count" not in experiment_notebooks({"dataset": "bccd", "crop": "cell", "ablation_of": "bccd"})
