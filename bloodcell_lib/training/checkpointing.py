"""A run folder's files across epochs: the epoch's checkpoint (last, and best linked to it),
history.csv, and what resume checks and repairs before continuing a checkpoint.

At the end of every epoch checkpoint_last.pt, then checkpoint_best.pt (when the epoch improved
the monitored metric; every epoch with monitor: none), then history.csv are written atomically,
so a kill at any moment loses at most the epoch in progress.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bloodcell_lib.core import distributed as D
from bloodcell_lib.core.fileio import atomic_link, atomic_write_text
from bloodcell_lib.modeling.checkpoint import read_checkpoint, save_checkpoint
from bloodcell_lib.modeling.rundir import RunDir
from bloodcell_lib.training.config import TrainConfig, resume_may_change
from bloodcell_lib.training.console import log


HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc",
                   "val_macro_f1", "lr", "seconds"]
# What a fresh run replaces of an earlier run in the same folder.
RUN_FILES = (RunDir.CHECKPOINT_LAST, RunDir.CHECKPOINT_BEST, RunDir.HISTORY, RunDir.RUN_INFO, RunDir.SPLIT)


class ResumeError(RuntimeError):
    """The checkpoint in the run directory cannot be continued with this configuration."""


def plain(value: Any) -> Any:
    """Plain Python values, so checkpoints load with torch.load(weights_only=True)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value) if isinstance(value, tuple) else [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def check_resumable(cfg: TrainConfig, ckpt: dict[str, Any], class_names: list[str], split_sha: str | None,
                    path: Path) -> None:
    old = ckpt.get("config", {})
    new = cfg.to_dict()
    may_change = resume_may_change()
    diffs = [f"'{k}': {old.get(k)!r} in the checkpoint, {new.get(k)!r} now"
             for k in new if k not in may_change and old.get(k) != new.get(k)]
    if old.get("epochs") != cfg.epochs and cfg.scheduler in ("cosine", "onecycle", "step"):
        diffs.append(f"'epochs': {old.get('epochs')!r} in the checkpoint, {cfg.epochs!r} now "
                     f"(the '{cfg.scheduler}' learning-rate schedule is laid out over the number of epochs)")
    if list(ckpt.get("class_names", [])) != list(class_names):
        diffs.append(f"classes: {ckpt.get('class_names')} in the checkpoint, {class_names} now")
    if split_sha and ckpt.get("split_sha256") and ckpt["split_sha256"] != split_sha:
        diffs.append("split.csv: its sha256 differs from the one the checkpoint was trained on")
    if diffs:
        raise ResumeError(
            f"cannot resume from {path}: the configuration differs in ways that change the model:\n  "
            + "\n  ".join(diffs)
            + "\nUse the checkpoint's settings, or start a new run (another 'name', or without --resume).")


def clean_stale_temp_files(run_dir: Path) -> None:
    # A SIGKILL during an atomic write leaves its temporary file behind (never the target).
    for tmp in run_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def _write_history(run_dir: Path, history: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(history, columns=HISTORY_COLUMNS)
    atomic_write_text(RunDir(run_dir).history, frame.to_csv(index=False))
    return frame


def save_epoch_files(run_dir: Path, checkpoint: dict[str, Any], improved: bool,
                     history: list[dict[str, Any]]) -> None:
    """checkpoint_last.pt, then checkpoint_best.pt (the same file, linked) if this epoch is
    the best so far, then history.csv; each atomic. Last before best: a kill in between leaves a last
    checkpoint whose best_epoch is its own epoch, from which resume restores the best file
    (see repair_best). History last: it never lists an epoch that has no checkpoint."""
    files = RunDir(run_dir)
    save_checkpoint(checkpoint, files.checkpoint_last)
    if improved:
        atomic_link(files.checkpoint_last, files.checkpoint_best)
    _write_history(run_dir, history)


def resumed_checkpoint(cfg: TrainConfig, run_dir: Path, info: D.DistInfo) -> dict[str, Any] | None:
    """Decide on rank 0 whether this run continues a checkpoint, then tell the others. A fresh
    run clears an earlier run's files first."""
    files = RunDir(run_dir)
    checkpoint = None
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        clean_stale_temp_files(run_dir)
        if cfg.resume and files.checkpoint_last.is_file():
            checkpoint = read_checkpoint(files.checkpoint_last)
            log(f"resume: continuing {files.checkpoint_last} after epoch {checkpoint['epoch']}")
        else:
            if cfg.resume:
                log(f"resume: no checkpoint at {files.checkpoint_last}; starting a fresh run")
            _remove_previous_run(cfg, run_dir)
    return D.broadcast_object(checkpoint)


def _remove_previous_run(cfg: TrainConfig, run_dir: Path) -> None:
    pinned = Path(cfg.split_file).expanduser().resolve() if cfg.split_file else None
    stale = [name for name in RUN_FILES if (run_dir / name).exists() and (run_dir / name).resolve() != pinned]
    if stale:
        # A fresh run must not leave an older run's files behind for a later --resume.
        log(f"fresh run in {run_dir}: replacing the previous run's {', '.join(stale)}")
        for name in stale:
            (run_dir / name).unlink()


def repair_best(checkpoint: dict, last_path: Path, best_path: Path) -> None:
    """Make checkpoint_best.pt match the best epoch the last checkpoint records.

    A kill between writing checkpoint_last.pt and checkpoint_best.pt leaves the previous
    best file behind; then the best epoch is the last checkpoint's own epoch and its
    weights are in checkpoint_last.pt.
    """
    best_epoch = int(checkpoint.get("best_epoch", 0))
    current = None
    if best_path.is_file():
        try:
            current = int(read_checkpoint(best_path).get("epoch", -1))
        except Exception:  # unreadable: rebuilt below when possible
            current = None
    if current == best_epoch:
        return
    if best_epoch == int(checkpoint["epoch"]):
        log(f"resume: {best_path.name} did not hold epoch {best_epoch}; restoring it from {last_path.name}")
        atomic_link(last_path, best_path)
    else:
        log(f"WARNING: {best_path.name} holds epoch {current}, but the best epoch recorded is {best_epoch}")
