"""DDP under torchrun on CPU (gloo): same result as one process, only rank 0 writes, and a
killed rank fails the whole run cleanly without damaging the checkpoints."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import real_data
from test_train import make_tiny_dataset

from bloodcell_lib.core import distributed as D
from bloodcell_lib.training import train
from bloodcell_lib.training.config import make_config
from bloodcell_lib.core.paths import PROJECT_ROOT

pytestmark = pytest.mark.slow

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

# Installed into every torchrun worker through PYTHONPATH: logs each file the process opens
# for writing, renames, creates or deletes (Python's audit events), one log per rank.
AUDIT_SITECUSTOMIZE = textwrap.dedent("""
    import os, sys
    _log_dir = os.environ.get("BLOODCELL_AUDIT_DIR")
    if _log_dir and "RANK" in os.environ:
        _log = open(os.path.join(_log_dir, f"rank{os.environ['RANK']}_{os.getpid()}.log"), "a", buffering=1)
        _write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT
        def _hook(event, args):
            if event == "open":
                path, mode, flags = args
                writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    isinstance(flags, int) and flags != -1 and flags & _write_flags)
                if writes and isinstance(path, (str, bytes, os.PathLike)):
                    _log.write(f"open {os.fsdecode(path)}\\n")
            elif event in ("os.rename", "os.replace", "os.remove", "os.unlink", "os.mkdir", "shutil.rmtree"):
                _log.write(f"{event} {os.fsdecode(args[0]) if isinstance(args[0], (str, bytes)) else args[0]}\\n")
        sys.addaudithook(_hook)
""")


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("BLOODCELL_TEST_KILL", "RANK", "WORLD_SIZE")}
    env.update(BLOODCELL_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    return env


def _torchrun(tmp_path: Path, config: Path, nproc: int = 2, timeout: float = 300, **env: str):
    cmd = [*TORCHRUN, f"--nproc_per_node={nproc}", "--standalone",
           "-m", "bloodcell_lib", "train", "--config", str(config), "--no-progress"]
    return subprocess.run(cmd, cwd=PROJECT_ROOT, env=_env(tmp_path, **env), capture_output=True, text=True,
                          timeout=timeout)


def _write(tmp_path: Path, params: dict) -> Path:
    path = tmp_path / f"{params['name']}.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_ddp_matches_one_process_and_only_rank0_writes(tmp_path, monkeypatch):
    """Two CPU ranks vs one process, same seed and global batch (16 = 2 x 8), on real PBC images.

    Tolerance: the backbone is frozen (its BatchNorm layers then run in eval mode, so there
    are no per-rank batch statistics) and augmentation is off, so both runs see the same
    global batches and average the same gradients; they differ only in float summation
    order (gloo's all-reduce, mean of per-rank means). Measured on this CPU: losses agree
    to ~1e-7 relative and every accuracy is identical. Allowed: losses to 1e-4 relative,
    val accuracy to one image. (Training the whole network instead lets BatchNorm normalise
    each rank's 8 images separately; that moved val accuracy by up to 0.08 after 2 epochs
    here, like a change of seed, which is too loose to catch a sharding bug.)
    """
    pbc = real_data("pbc")
    params = dict(name="ddp", dataset="pbc", data_dir=str(pbc), subset_per_class=40, val_fraction=0.25,
                  test_fraction=0.2, model="efficientnet_lite0", pretrained=True, freeze="backbone",
                  image_size=40, batch_size=16, epochs=2, lr=3e-3, augment="none", seed=0, threads=1,
                  output_dir=str(tmp_path / "runs"))
    audit = tmp_path / "audit"
    audit.mkdir()
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(AUDIT_SITECUSTOMIZE)
    pythonpath = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    proc = _torchrun(tmp_path, _write(tmp_path, params), BLOODCELL_AUDIT_DIR=str(audit), PYTHONPATH=pythonpath)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world size 2" in proc.stdout and "(8/rank)" in proc.stdout
    assert proc.stdout.count("epoch 2/2 ") == 1  # only rank 0 logs

    # One process, same data and settings, in this process (cache already built by rank 0).
    monkeypatch.setattr(train.provenance, "git_commit", lambda *a, **k: None)
    monkeypatch.setenv("BLOODCELL_CACHE", str(tmp_path / "cache"))
    single = train.fit(make_config({**params, "name": "single"}), progress=False)

    ddp_run = tmp_path / "runs" / "ddp"
    ddp_hist = pd.read_csv(ddp_run / "history.csv")
    n_val = json.loads((ddp_run / "run_info.json").read_text())["val_images"]
    assert n_val >= 60
    one_image = 1 / n_val + 1e-9
    for column in ("val_acc", "val_balanced_acc", "train_acc"):
        assert abs(ddp_hist[column] - single.history[column]).max() <= one_image, (column, ddp_hist, single.history)
    for column in ("train_loss", "val_loss"):
        assert ddp_hist[column].tolist() == pytest.approx(single.history[column].tolist(), rel=1e-4), column
    assert (ddp_run / "split.csv").read_bytes() == (single.run_dir / "split.csv").read_bytes()
    info = json.loads((ddp_run / "run_info.json").read_text())
    assert info["distributed"]["world_size"] == 2 and info["distributed"]["backend"] == "gloo"

    # Only rank 0 wrote: the other rank opened nothing for writing in the run or cache folder.
    logs = {path.name: path.read_text().splitlines() for path in audit.glob("rank*.log")}
    assert any(name.startswith("rank0_") for name in logs) and any(name.startswith("rank1_") for name in logs)
    watched = (str(tmp_path / "runs"), str(tmp_path / "cache"))
    rank1 = [line for name, lines in logs.items() if name.startswith("rank1_") for line in lines
             if watched[0] in line or watched[1] in line]
    rank0 = [line for name, lines in logs.items() if name.startswith("rank0_") for line in lines
             if watched[0] in line]
    assert rank1 == [], rank1
    assert any("checkpoint_last.pt" in line for line in rank0)  # the audit does see writes


def test_killed_rank_fails_the_run_and_leaves_loadable_checkpoints(tmp_path):
    data = make_tiny_dataset(tmp_path / "data", per_class=12)
    params = dict(name="killed", dataset="folder", data_dir=str(data), model="resnet18", pretrained=False,
                  image_size=32, batch_size=8, epochs=3, val_fraction=0.25, test_fraction=0.2, threads=1,
                  output_dir=str(tmp_path / "runs"))
    proc = _torchrun(tmp_path, _write(tmp_path, params), BLOODCELL_TEST_KILL="1:2:0")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "killing itself" in output
    assert "SIGKILL" in output or "Signal 9" in output or "exitcode  : -9" in output, output[-3000:]
    run = tmp_path / "runs" / "killed"
    for name in ("checkpoint_last.pt", "checkpoint_best.pt"):
        ckpt = torch.load(run / name, map_location="cpu", weights_only=True)
        assert ckpt["epoch"] == 1, name
    assert pd.read_csv(run / "history.csv")["epoch"].tolist() == [1]


def test_env_without_torchrun_is_one_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    info = D.env_info()
    assert (info.rank, info.world_size, info.local_rank, info.is_main) == (0, 1, 0, True)
    assert D.all_reduce(torch.tensor([3.0])).item() == 3.0 and D.broadcast_object("x") == "x"
    assert D.select_device(0).type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    info = D.env_info()
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (3, 4, 1, 2)


def test_threads_split_the_cores_between_local_ranks(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
        assert D.set_threads(0, local_world_size=4) == 2
        assert D.set_threads(3, local_world_size=4) == 3
        assert D.set_threads(0, local_world_size=16) == 1
    finally:
        torch.set_num_threads(before)
