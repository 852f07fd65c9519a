"""A run folder and the name of every file in it: what training writes, what evaluation,
resume, the notebooks and the reports read.

    <run_dir>/config.yaml          the TrainConfig (a cross-validated experiment: at the top)
    <run_dir>/split.csv            path,label,split[,box] of every image the run saw
    <run_dir>/history.csv          one row per finished epoch
    <run_dir>/checkpoint_last.pt   after every epoch (what --resume continues)
    <run_dir>/checkpoint_best.pt   the epoch best by the monitor (what evaluation scores)
    <run_dir>/run_info.json        provenance (core.provenance)
    <run_dir>/predictions_<split>[_<tag>].csv, metrics_<split>[_<tag>].json   evaluation
    <run_dir>/fold_<i>/            one run folder per fold of a cross-validated experiment
    <run_dir>/cv_summary.csv       ... and one row per fold (best epoch, best metric, ...)
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunDir:
    path: Path

    CONFIG = "config.yaml"
    SPLIT = "split.csv"
    HISTORY = "history.csv"
    CHECKPOINT_LAST = "checkpoint_last.pt"
    CHECKPOINT_BEST = "checkpoint_best.pt"  # the checkpoint training kept (best by monitor, or the last epoch)
    RUN_INFO = "run_info.json"
    CV_SUMMARY = "cv_summary.csv"  # a cross-validated experiment: one row per fold
    # What one training run leaves, in the order a notebook lists them.
    TRAINING_FILES = (CHECKPOINT_BEST, CHECKPOINT_LAST, HISTORY, SPLIT, CONFIG, RUN_INFO)

    def __init__(self, path: str | os.PathLike):
        object.__setattr__(self, "path", Path(path))

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    @property
    def split(self) -> Path:
        return self.path / self.SPLIT

    @property
    def history(self) -> Path:
        return self.path / self.HISTORY

    @property
    def checkpoint_last(self) -> Path:
        return self.path / self.CHECKPOINT_LAST

    @property
    def checkpoint_best(self) -> Path:
        return self.path / self.CHECKPOINT_BEST

    @property
    def run_info(self) -> Path:
        return self.path / self.RUN_INFO

    @property
    def cv_summary(self) -> Path:
        return self.path / self.CV_SUMMARY

    def predictions(self, split: str, tag: str | None = None) -> Path:
        return self.path / f"predictions_{_suffix(split, tag)}.csv"

    def metrics(self, split: str, tag: str | None = None) -> Path:
        return self.path / f"metrics_{_suffix(split, tag)}.json"

    def fold(self, index: int) -> "RunDir":
        return RunDir(self.path / f"fold_{index}")

    def folds(self) -> list["RunDir"]:
        """The ``fold_<i>`` sub-folders of a cross-validated experiment, in fold order."""
        found = [p for p in self.path.glob("fold_*") if p.is_dir() and re.fullmatch(r"fold_\d+", p.name)]
        return [RunDir(p) for p in sorted(found, key=lambda p: int(p.name.split("_")[1]))]

    def runs(self) -> list["RunDir"]:
        """The folds of a cross-validated experiment, else the run itself."""
        return self.folds() or [self]

    def training_files_present(self) -> list[str]:
        return [name for name in self.TRAINING_FILES if (self.path / name).is_file()]


def _suffix(split: str, tag: str | None) -> str:
    return f"{split}_{tag}" if tag else split


# The checkpoint every evaluation scores: the one training kept.
KEPT_CHECKPOINT = RunDir.CHECKPOINT_BEST


def fold_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """``run_dir/fold_<i>`` sub-directories, in fold order."""
    return [fold.path for fold in RunDir(run_dir).folds()]
