"""Interruption: SIGKILL at any moment loses at most the epoch in progress, never a file,
and --resume then ends exactly where an uninterrupted run ends (deterministic mode)."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from test_train import make_tiny_dataset

from bloodcell_lib.training import checkpointing, train
from bloodcell_lib.core.paths import PROJECT_ROOT

pytestmark = pytest.mark.slow


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "BLOODCELL_TEST_KILL"}
    env.update(BLOODCELL_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    return env


def _write_config(tmp_path: Path, data: Path, name: str, **overrides) -> Path:
    params = dict(name=name, dataset="folder", data_dir=str(data), output_dir=str(tmp_path / "runs"),
                  model="resnet18", pretrained=False, image_size=32, batch_size=8, epochs=3, lr=1e-3,
                  scheduler="cosine", augment="strong", val_fraction=0.25, test_fraction=0.2, threads=1,
                  seed=1, deterministic=True)
    params.update(overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _start(config: Path, tmp_path: Path, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bloodcell_lib", "train", "--config", str(config),
                             "--no-progress", *args], cwd=PROJECT_ROOT, env=_env(tmp_path, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _train(config: Path, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return _finish(_start(config, tmp_path, *args, **env))


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("resume") / "data", per_class=16)


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(tmp_path, data):
    full_cfg = _write_config(tmp_path, data, "full")
    part_cfg = _write_config(tmp_path, data, "part")
    runs = tmp_path / "runs"

    # The uninterrupted run and the one SIGKILLed in the middle of epoch 2 (its second
    # batch, after epoch 1 was saved) run side by side to save wall time.
    full_proc = _start(full_cfg, tmp_path)
    killed = _train(part_cfg, tmp_path, BLOODCELL_TEST_KILL="0:2:1")
    full = _finish(full_proc)
    assert full.returncode == 0, full.stderr
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stdout, killed.stderr)
    assert "killing itself" in killed.stdout
    ckpt = _load(runs / "part" / "checkpoint_last.pt")
    assert ckpt["epoch"] == 1
    assert len(pd.read_csv(runs / "part" / "history.csv")) == 1
    assert _load(runs / "part" / "checkpoint_best.pt")["epoch"] == 1

    resumed = _train(part_cfg, tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "continuing" in resumed.stdout and "after epoch 1" in resumed.stdout

    a, b = _load(runs / "full" / "checkpoint_last.pt"), _load(runs / "part" / "checkpoint_last.pt")
    assert a["epoch"] == b["epoch"] == 3
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    metrics = [c for c in train.HISTORY_COLUMNS if c != "seconds"]
    ha, hb = pd.read_csv(runs / "full" / "history.csv"), pd.read_csv(runs / "part" / "history.csv")
    pd.testing.assert_frame_equal(ha[metrics], hb[metrics])
    assert a["best_epoch"] == b["best_epoch"] and a["best_metric"] == b["best_metric"]
    best_a, best_b = _load(runs / "full" / "checkpoint_best.pt"), _load(runs / "part" / "checkpoint_best.pt")
    assert all(torch.equal(best_a["model"][k], best_b["model"][k]) for k in best_a["model"])


def test_sigkill_at_random_moments_leaves_loadable_files_and_resume_finishes(tmp_path, data):
    cfg = _write_config(tmp_path, data, "random_kill", epochs=5, scheduler="none", augment="light",
                        deterministic=False)
    run = tmp_path / "runs" / "random_kill"
    history = run / "history.csv"
    rng = random.Random(0)
    for attempt in range(1):  # more attempts test more moments, at ~10 s each
        proc = subprocess.Popen([sys.executable, "-m", "bloodcell_lib", "train", "--config", str(cfg),
                                 "--no-progress", *(["--resume"] if attempt else [])], cwd=PROJECT_ROOT,
                                env=_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            rows_before = len(pd.read_csv(history)) if history.exists() else 0
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and proc.poll() is None:
                if history.exists() and len(pd.read_csv(history)) > rows_before:
                    break
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.8))  # somewhere in the next epoch or its saving
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        ckpt = _load(run / "checkpoint_last.pt")
        best = _load(run / "checkpoint_best.pt")
        rows = len(pd.read_csv(history))
        # Files are written last -> best -> history, so history lags the checkpoint by at most one.
        assert ckpt["epoch"] - 1 <= rows <= ckpt["epoch"]
        assert best["epoch"] <= ckpt["epoch"]

    done = _train(cfg, tmp_path, "--resume")
    assert done.returncode == 0, done.stderr
    assert pd.read_csv(history)["epoch"].tolist() == [1, 2, 3, 4, 5]
    assert _load(run / "checkpoint_last.pt")["epoch"] == 5
    assert not list(run.glob(".*.tmp"))


SAVE_LOOP = textwrap.dedent("""
    import sys, torch
    from bloodcell_lib.core.fileio import atomic_torch_save
    path = sys.argv[1]
    i = 0
    while True:
        i += 1
        atomic_torch_save({"i": i, "w": torch.full((2_000_000,), float(i))}, path)
        print(i, flush=True)
""")


def test_checkpoint_writes_are_never_truncated_by_sigkill(tmp_path):
    """Kill a process that does nothing but save (8 MB) checkpoints: the file always loads
    whole, holding one complete save; leftover temporary files are cleaned on the next start."""
    target = tmp_path / "run" / "checkpoint_last.pt"
    rng = random.Random(1)
    last_seen = 0
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(target)], cwd=PROJECT_ROOT,
                                env=_env(tmp_path), stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one save completed
        time.sleep(rng.uniform(0.05, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        obj = _load(target)
        assert torch.equal(obj["w"], torch.full((2_000_000,), float(obj["i"])))
        last_seen = obj["i"]
    assert last_seen >= 1
    checkpointing.clean_stale_temp_files(target.parent)
    assert [p.name for p in target.parent.iterdir()] == ["checkpoint_last.pt"]
