"""Training: fit() and fit_experiment() (the ``train`` command: training.cli), as named steps
over FitState; one epoch is training.loop, the data training.data_loading, the run folder's
files training.checkpointing.

Laid out like torchvision's references/classification/train.py: flat functions, one
checkpoint dict, ``--resume``. What differs, and why:

- Images are decoded and resized once into a uint8 tensor cache (data_loading); batches are
  sliced from it, augmented with tensor ops and normalised on the fly.
- Every random draw of an epoch (sample order, augmentation, dropout) comes from
  generators seeded by (seed, epoch), never from what ran before. A run resumed from the
  checkpoint of epoch k therefore repeats epochs k+1.. exactly as the uninterrupted run
  would have (bit for bit in deterministic mode).
- At the end of every epoch checkpoint_last.pt, then checkpoint_best.pt (when the epoch
  improved the monitored metric; every epoch with monitor: none), then history.csv and
  run_info.json are written atomically, so a kill at any moment loses at most the epoch in
  progress.
- Under torchrun each rank takes a strided share of one global sample order and a
  batch of batch_size // world_size, so N processes see the same global batches as one
  process; metrics are summed over ranks; only rank 0 writes files or prints.
"""
from __future__ import annotations

import os


# Spinning OpenMP threads stall each other by 10x or more when a CPU is shared with other
# processes (measured: 2 threads on a busy 2-core box, 17-40 s/epoch spinning vs 2.4 s
# passive). Only takes effect if torch was not imported before this module; the user's
# own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from bloodcell_lib.core import distributed as D
from bloodcell_lib.core import provenance
from bloodcell_lib.core.fileio import atomic_write_text, sha256_file
from bloodcell_lib.modeling.rundir import RunDir
from bloodcell_lib.training import sampling
from bloodcell_lib.training.calibrate import calibrate_run
from bloodcell_lib.training.checkpointing import (HISTORY_COLUMNS, check_resumable, plain, repair_best,
                                                  resumed_checkpoint, save_epoch_files)
from bloodcell_lib.training.config import ConfigError, TrainConfig, config_to_yaml
from bloodcell_lib.training.console import log
from bloodcell_lib.training.data_loading import Batches, PreparedData, move_data_to_gpu, prepare_data
from bloodcell_lib.training.loop import evaluate, train_one_epoch
from bloodcell_lib.training.model_init import build_model
from bloodcell_lib.training.optim import build_optimizer, build_scheduler, class_weights_for
from bloodcell_lib.training.signals import SIGNALS


LOWER_IS_BETTER = {"val_loss"}


@dataclass
class RunResult:
    run_dir: Path
    history: pd.DataFrame
    best_epoch: int
    best_metric: float
    class_names: list[str]
    train_seconds: float
    pretrained_used: bool
    checkpoint_best: Path
    checkpoint_last: Path | None = None
    monitor: str = "val_acc"
    fold: int | None = None
    stopped_early: bool = False
    epochs_run: int = 0
    failed_images: list[tuple[str, str]] = field(default_factory=list)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this set before its first use to give repeatable results.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: on CUDA a few ops every CNN uses (adaptive average pooling's backward)
        # have no deterministic kernel and would otherwise abort the run; on the CPU every
        # op used here is deterministic, so runs repeat bit for bit.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return D.mixed_seed(seed, epoch, rank * 15_485_863 + 1)


def _is_better(value: float, best: float | None, monitor: str) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value < best if monitor in LOWER_IS_BETTER else value > best


def fit(cfg: TrainConfig, *, fold: int | None = None, progress: bool = True) -> RunResult:
    """Train one model as ``cfg`` says; write the run directory; return its summary.

    With ``fold`` (cross-validation) the run directory is cfg.run_dir/fold_{fold} and the
    split is that fold of splits.kfold_splits. Works unchanged under torchrun.
    """
    previous_threads = torch.get_num_threads()
    was_deterministic = (torch.are_deterministic_algorithms_enabled(),
                         torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        try:
            info = D.init_distributed(cfg.threads, device=cfg.device)
        except ValueError as err:  # a device this machine does not have
            raise ConfigError(str(err)) from None
        if cfg.batch_size < info.world_size:
            raise ConfigError(f"parameter 'batch_size' = {cfg.batch_size} is smaller than the number of "
                              f"processes ({info.world_size}); the global batch is split across them")
        run_dir = cfg.run_dir if fold is None else RunDir(cfg.run_dir).fold(fold).path
        seed_everything(cfg.seed, cfg.deterministic)
        result = _fit(cfg, run_dir, fold, info, progress, time.time())
        calibrate_run(result.run_dir, info.device)  # temperature and review thresholds, fitted on val only
        return result
    finally:
        # Leave the calling process (a notebook kernel, pytest) as it was.
        torch.use_deterministic_algorithms(was_deterministic[0], warn_only=was_deterministic[1])
        torch.set_num_threads(previous_threads)


@dataclass
class FitState:
    """What the steps of one run share: the run's inputs, what setup built, and the progress
    that resume restores and every epoch updates."""

    cfg: TrainConfig
    run_dir: Path
    fold: int | None
    info: D.DistInfo
    progress: bool
    started: float
    checkpoint: dict[str, Any] | None  # the checkpoint being resumed, or None
    data: PreparedData | None = None
    split_sha: str | None = None
    data_config: dict[str, Any] = field(default_factory=dict)
    cfg_dict: dict[str, Any] = field(default_factory=dict)
    model: Any = None
    train_model: Any = None  # the model, or its DDP wrapper
    pretrained_used: bool = False
    optimizer: Any = None
    scheduler: Any = None
    per_batch: bool = False  # scheduler stepped per batch (else per epoch)
    criterion: Any = None
    per_rank_batch: int = 1
    steps_per_epoch: int = 0
    train_labels: Any = None  # the CPU copy: sampling draws from CPU generators
    val_loader: Any = None
    init_record: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0
    best_metric: float | None = None
    best_epoch: int = 0
    since_best: int = 0
    stopped_early: bool = False

    @property
    def files(self) -> RunDir:
        return RunDir(self.run_dir)

    @property
    def class_names(self) -> list[str]:
        return self.data.class_names

    @property
    def n_train(self) -> int:
        return len(self.data.train_labels)


def _fit(cfg: TrainConfig, run_dir: Path, fold: int | None, info: D.DistInfo, progress: bool,
         started: float) -> RunResult:
    state = FitState(cfg, run_dir, fold, info, progress, started, resumed_checkpoint(cfg, run_dir, info))
    _setup(state)
    _restore(state)
    _announce(state)
    if info.is_main:
        _write_run_info(state, "running")
    _check_nothing_to_do(state)
    for epoch in range(state.start_epoch + 1, cfg.epochs + 1):
        if state.stopped_early:
            break
        row, improved, train_stats = _run_epoch(state, epoch)
        if info.is_main:
            _save_epoch(state, epoch, improved)
            _log_epoch(state, row, improved, train_stats)
        if cfg.early_stopping_patience and state.since_best >= cfg.early_stopping_patience:
            log(f"early stopping: {cfg.monitor} has not improved for {state.since_best} epoch(s); "
                f"best {state.best_metric:.4f} at epoch {state.best_epoch}")
            state.stopped_early = True
            break
    D.barrier()
    return _summarise(state)


def _setup(state: FitState) -> None:
    """Data, model, optimizer, schedule, loss and loaders, in the order that fixes the seeded
    initial weights."""
    from bloodcell_lib.modeling import models

    cfg, info, checkpoint = state.cfg, state.info, state.checkpoint
    data = state.data = prepare_data(cfg, state.run_dir, state.fold, info, state.progress)
    num_classes = len(data.class_names)
    split_sha = sha256_file(data.split_path) if info.is_main and data.split_path.is_file() else None
    state.split_sha = D.broadcast_object(split_sha)
    if checkpoint is not None:
        check_resumable(cfg, checkpoint, data.class_names, state.split_sha, state.files.checkpoint_last)

    data_config = dict(models.resolve_data_config(cfg.model, cfg.image_size))
    data_config.update(image_size=cfg.image_size, crop=cfg.crop, crop_margin=cfg.crop_margin,
                       crop_window=cfg.crop_window)
    if checkpoint is not None and checkpoint["data_config"].get("color_norm"):
        data_config["color_norm"] = checkpoint["data_config"]["color_norm"]  # resumed: the same reference
    elif cfg.color_norm != "none":
        from bloodcell_lib.data.color_norm import reference

        data_config["color_norm"] = D.broadcast_object(reference(data.train_images) if info.is_main else None)
    state.data_config = plain(data_config)

    model, state.pretrained_used = build_model(cfg, num_classes, load_pretrained=checkpoint is None)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        state.pretrained_used = bool(checkpoint.get("pretrained_used", state.pretrained_used))
    model.to(info.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    state.model = model
    state.optimizer = build_optimizer(cfg, model)

    state.per_rank_batch = max(1, cfg.batch_size // info.world_size)
    per_rank_train = -(-state.n_train // info.world_size)
    state.steps_per_epoch = len(D.batches(torch.arange(per_rank_train), state.per_rank_batch))
    state.scheduler, state.per_batch = build_scheduler(cfg, state.optimizer, state.steps_per_epoch)

    state.train_model = model
    if info.is_distributed:
        state.train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)

    weights = class_weights_for(data.train_labels, num_classes).to(info.device) if cfg.class_weights else None
    state.criterion = nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.label_smoothing)


def _restore(state: FitState) -> None:
    """Continue the resumed checkpoint's optimizer, schedule, history and best epoch; then
    put the data where the model is and build the validation loader."""
    checkpoint, info = state.checkpoint, state.info
    if checkpoint is not None:
        state.optimizer.load_state_dict(checkpoint["optimizer"])
        if state.scheduler is not None and checkpoint.get("scheduler") is not None:
            state.scheduler.load_state_dict(checkpoint["scheduler"])
        state.start_epoch = int(checkpoint["epoch"])
        state.history = list(checkpoint.get("history", []))[:state.start_epoch]
        state.best_metric, state.best_epoch = checkpoint.get("best_metric"), int(checkpoint.get("best_epoch", 0))
        state.since_best = int(checkpoint.get("epochs_since_improvement", 0))
        if info.is_main:
            repair_best(checkpoint, state.files.checkpoint_last, state.files.checkpoint_best)

    data = state.data
    state.train_labels = data.train_labels
    if info.device.type == "cuda":
        move_data_to_gpu(data, info.device)
    state.cfg_dict = plain(state.cfg.to_dict())
    val_per_rank = D.rank_share(torch.arange(len(data.val_labels)), info.rank, info.world_size, pad=False)
    state.val_loader = Batches(data.val_images, data.val_labels, val_per_rank, state.per_rank_batch * 2)


def _announce(state: FitState) -> None:
    """config.yaml and the run's first log lines (rank 0); what run_info records of init_from."""
    cfg, info, data = state.cfg, state.info, state.data
    if info.is_main:
        atomic_write_text(state.files.config, config_to_yaml(cfg))
        counts = torch.bincount(state.train_labels, minlength=len(data.class_names)).tolist()
        init = (f"weights of {cfg.init_checkpoint}" if cfg.init_from
                else "ImageNet weights" if state.pretrained_used else "random init")
        log(f"run {state.run_dir}: {cfg.model} ({init}), "
            f"{len(data.class_names)} classes, train {state.n_train} / val {len(data.val_labels)} images at "
            f"{cfg.image_size}px, device {info.device}, world size {info.world_size}, threads "
            f"{torch.get_num_threads()}, batch {cfg.batch_size} ({state.per_rank_batch}/rank), "
            f"{state.steps_per_epoch} steps/epoch")
        log("train class counts: " + ", ".join(f"{c}={n}" for c, n in zip(data.class_names, counts)))
    if cfg.init_from:
        init_path = cfg.init_checkpoint
        state.init_record = {"path": str(init_path),
                             "sha256": sha256_file(init_path) if init_path.is_file() else None}


def _write_run_info(state: FitState, status: str) -> None:
    from bloodcell_lib.modeling import models

    cfg, info, data, history = state.cfg, state.info, state.data, state.history
    secs = [h["seconds"] for h in history]
    imgs = sum(h.get("train_samples", state.n_train) for h in history)
    pass_secs = sum(h.get("train_pass_seconds", h["seconds"]) for h in history)
    record = provenance.collect(
        state.cfg_dict, seed=cfg.seed, split_file=data.split_path,
        pretrained_requested=cfg.pretrained, pretrained_used=state.pretrained_used,
        init_checkpoint=state.init_record,
        weights=models.weights_status(cfg.model),
        timings={"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(state.started)),
                 "cache_seconds": round(data.cache_seconds, 3),
                 "train_seconds": round(sum(secs), 3), "epochs_completed": len(history),
                 "seconds_per_epoch": round(sum(secs) / len(secs), 3) if secs else None,
                 "train_images_per_second": round(imgs / pass_secs, 2) if secs and pass_secs else None},
        dropped=data.dropped, failed=data.failed,
        distributed={"world_size": info.world_size, "backend": info.backend, "device": str(info.device),
                     "per_rank_batch_size": state.per_rank_batch, "threads_per_process": torch.get_num_threads()},
        extra={"status": status, "fold": state.fold, "run_dir": str(state.run_dir), "class_names": data.class_names,
               "train_images": state.n_train, "val_images": len(data.val_labels),
               "monitor": cfg.monitor, "best_epoch": state.best_epoch, "best_metric": state.best_metric,
               "resumed_from_epoch": int(state.checkpoint["epoch"]) if state.checkpoint is not None else None})
    provenance.write_run_info(state.files.run_info, plain(record))


def _check_nothing_to_do(state: FitState) -> None:
    cfg = state.cfg
    if state.start_epoch >= cfg.epochs:
        log(f"nothing to do: the checkpoint already completed {state.start_epoch} of {cfg.epochs} epochs")
    if state.checkpoint is not None and cfg.early_stopping_patience and state.since_best >= cfg.early_stopping_patience:
        log(f"nothing to do: the checkpointed run had already stopped early at epoch {state.start_epoch}")
        state.stopped_early = True


def _run_epoch(state: FitState, epoch: int) -> tuple[dict[str, Any], bool, dict[str, Any]]:
    """Train one epoch from generators seeded by (seed, epoch, rank), validate, append the
    history row and track the best epoch: (row, improved, train stats)."""
    cfg, info, data = state.cfg, state.info, state.data
    t0 = time.perf_counter()
    lr = state.optimizer.param_groups[0]["lr"]
    torch.manual_seed(_epoch_seed(cfg.seed, epoch, info.rank))  # dropout etc.
    if cfg.per_source_balanced:
        order = sampling.per_source_balanced_order(state.train_labels, data.train_sources, epoch, cfg.seed,
                                                   rank=info.rank, world_size=info.world_size)
    else:
        order = D.epoch_indices(state.train_labels, epoch, cfg.seed, rank=info.rank,
                                world_size=info.world_size, balanced=cfg.balanced_sampling)
    aug_gen = D.epoch_generator(cfg.seed, epoch, stream=1 + info.rank)
    loader = Batches(data.train_images, data.train_labels, order, state.per_rank_batch)
    train_stats = train_one_epoch(state.train_model, state.criterion, state.optimizer, loader, info.device, epoch,
                                  data_config=state.data_config, augment=cfg.augment, generator=aug_gen,
                                  channels_last=cfg.channels_last,
                                  scheduler=state.scheduler if state.per_batch else None,
                                  progress=state.progress, epochs=cfg.epochs, adapt_frozen_bn=cfg.adapt_frozen_bn)
    train_pass_seconds = time.perf_counter() - t0
    if state.scheduler is not None and not state.per_batch:
        state.scheduler.step()
    val_stats = evaluate(state.model, state.val_loader, info.device, len(data.class_names),
                         data_config=state.data_config, channels_last=cfg.channels_last)
    row = {"epoch": epoch, "train_loss": train_stats["train_loss"], "train_acc": train_stats["train_acc"],
           "val_loss": val_stats["val_loss"], "val_acc": val_stats["val_acc"],
           "val_balanced_acc": val_stats["val_balanced_acc"], "val_macro_f1": val_stats["val_macro_f1"],
           "lr": lr, "seconds": time.perf_counter() - t0,
           # kept in the checkpoint (not history.csv) for throughput in run_info.json
           "train_pass_seconds": train_pass_seconds, "train_samples": train_stats["train_samples"]}
    state.history.append(row)
    return row, _track_best(state, row), train_stats


def _track_best(state: FitState, row: dict[str, Any]) -> bool:
    """Whether this epoch replaces the kept checkpoint; updates best and patience."""
    monitor = state.cfg.monitor
    if monitor == "none":  # no choice by validation: every epoch replaces the kept checkpoint
        state.best_epoch = row["epoch"]
        return True
    value = row[monitor]
    if _is_better(value, state.best_metric, monitor):
        state.best_metric, state.best_epoch, state.since_best = float(value), row["epoch"], 0
        return True
    state.since_best += 1
    return False


def _save_epoch(state: FitState, epoch: int, improved: bool) -> None:
    """The epoch's checkpoint, history and run_info (rank 0), a stop signal deferred meanwhile."""
    cfg, scheduler = state.cfg, state.scheduler
    with SIGNALS:
        ckpt = {
            "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "epoch": epoch, "config": state.cfg_dict, "class_names": state.class_names, "model_name": cfg.model,
            "data_config": state.data_config, "best_metric": state.best_metric, "best_epoch": state.best_epoch,
            "monitor": cfg.monitor, "epochs_since_improvement": state.since_best,
            "history": plain(state.history), "pretrained_used": state.pretrained_used, "split_sha256": state.split_sha,
            "fold": state.fold, "rng_state": torch.get_rng_state(),
        }
        save_epoch_files(state.run_dir, ckpt, improved, state.history)
        _write_run_info(state, "running")


def _log_epoch(state: FitState, row: dict[str, Any], improved: bool, train_stats: dict[str, Any]) -> None:
    throughput = train_stats["train_samples"] / max(row["train_pass_seconds"], 1e-9)
    log(f"epoch {row['epoch']}/{state.cfg.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}  |  "
        f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f} bal {row['val_balanced_acc']:.4f} "
        f"f1 {row['val_macro_f1']:.4f}  |  lr {row['lr']:.2e}  {row['seconds']:.1f}s {throughput:.0f} img/s"
        + ("  *best*" if improved else ""))


def _summarise(state: FitState) -> RunResult:
    cfg, best_metric = state.cfg, state.best_metric
    train_seconds = float(sum(h["seconds"] for h in state.history))
    if state.info.is_main:
        _write_run_info(state, "early_stopped" if state.stopped_early else "finished")
        kept = ("the last epoch (monitor: none)" if cfg.monitor == "none" else
                f"best {cfg.monitor} {best_metric if best_metric is not None else float('nan'):.4f} at epoch "
                f"{state.best_epoch}")
        log(f"done: kept {kept}; {train_seconds:.1f}s training; files in {state.run_dir}")
    frame = pd.DataFrame(state.history, columns=HISTORY_COLUMNS)
    return RunResult(run_dir=state.run_dir, history=frame, best_epoch=state.best_epoch,
                     best_metric=float("nan") if best_metric is None else float(best_metric),
                     class_names=state.class_names, train_seconds=train_seconds,
                     pretrained_used=bool(state.pretrained_used), checkpoint_best=state.files.checkpoint_best,
                     checkpoint_last=state.files.checkpoint_last, monitor=cfg.monitor, fold=state.fold,
                     stopped_early=state.stopped_early, epochs_run=len(state.history), failed_images=state.data.failed)


def fit_experiment(cfg: TrainConfig, *, progress: bool = True) -> list[RunResult]:
    """One run in cfg.run_dir, or with cfg.cv_folds = k one run per fold in cfg.run_dir/fold_{i}
    plus cfg.run_dir/cv_summary.csv (fold, best_epoch, best_metric, ...)."""
    if not cfg.cv_folds:
        return [fit(cfg, progress=progress)]
    if D.env_info().is_main:
        atomic_write_text(RunDir(cfg.run_dir).config, config_to_yaml(cfg))
    results = []
    for fold in range(cfg.cv_folds):
        log(f"===== fold {fold + 1}/{cfg.cv_folds} =====")
        results.append(fit(cfg, fold=fold, progress=progress))
    if D.is_main():
        summary = pd.DataFrame([{"fold": r.fold, "best_epoch": r.best_epoch, "monitor": r.monitor,
                                 "best_metric": r.best_metric, "epochs_run": r.epochs_run,
                                 "train_seconds": r.train_seconds, "run_dir": str(r.run_dir)}
                                for r in results])
        atomic_write_text(RunDir(cfg.run_dir).cv_summary, summary.to_csv(index=False))
    return results
