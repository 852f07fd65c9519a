"""Training: train_one_epoch, evaluate and fit() (the ``train`` command: training.cli).

Laid out like torchvision's references/classification/train.py: flat functions, one
checkpoint dict, ``--resume``. What differs, and why:

- Images are decoded and resized once into a uint8 tensor cache (cache.py); batches are
  sliced from it, augmented with tensor ops and normalised on the fly. No DataLoader
  workers: on a few CPU cores decoding JPEGs every epoch costs more than the model does.
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
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from tqdm import tqdm

from bloodcell_lib.core import distributed as D
from bloodcell_lib.core import provenance
from bloodcell_lib.data import sources
from bloodcell_lib.training import sampling
from bloodcell_lib.training.config import ConfigError, TrainConfig, config_to_yaml, resume_may_change
from bloodcell_lib.core.fileio import atomic_link, atomic_write_text, sha256_file
from bloodcell_lib.modeling.checkpoint import read_checkpoint, save_checkpoint
from bloodcell_lib.modeling.rundir import RunDir
from bloodcell_lib.training.signals import SIGNALS

HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc",
                   "val_macro_f1", "lr", "seconds"]
LOWER_IS_BETTER = {"val_loss"}
# What a fresh run replaces of an earlier run in the same folder.
RUN_FILES = (RunDir.CHECKPOINT_LAST, RunDir.CHECKPOINT_BEST, RunDir.HISTORY, RunDir.RUN_INFO, RunDir.SPLIT)


class ResumeError(RuntimeError):
    """The checkpoint in the run directory cannot be continued with this configuration."""


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


def log(*args: Any) -> None:
    """print() on rank 0 only, flushed so notebook and torchrun logs interleave correctly."""
    if D.is_main():
        print(*args, flush=True)


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool):
    # A handful of updates per epoch: readable in a static HTML report, not hundreds of \r lines.
    # delay: epochs shorter than that show no bar at all, only the epoch's summary line.
    return tqdm(iterable, total=total, desc=desc, file=sys.stdout, ascii=True, leave=False,
                disable=not enabled, delay=2.0, mininterval=5.0, maxinterval=1e9, miniters=max(1, total // 4),
                dynamic_ncols=False, ncols=100)


# --------------------------------------------------------------------------- reproducibility

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


# --------------------------------------------------------------------------- data

class Batches:
    """Batches of (uint8 images, labels) sliced from in-memory tensors in a given order."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, order: torch.Tensor, batch_size: int):
        self.images, self.labels = images, labels
        self.index_batches = D.batches(order, batch_size)

    def __len__(self) -> int:
        return len(self.index_batches)

    def __iter__(self):
        for idx in self.index_batches:
            idx = idx.to(self.images.device)
            yield self.images[idx], self.labels[idx]


def _to_model_input(x_uint8: torch.Tensor, device: torch.device, data_config: dict, channels_last: bool,
                    augment: str = "none", generator: torch.Generator | None = None) -> torch.Tensor:
    from bloodcell_lib.data import transforms

    # uint8 travels to the device (4x fewer bytes than float); augmentation runs there too,
    # drawing from the CPU epoch generator so CPU and GPU runs draw the same numbers.
    x = x_uint8.to(device, non_blocking=True)
    if augment in ("strong", "stain", "acquisition"):
        # Resampling and colour jitter work in float; staying in float avoids a uint8 round trip.
        x = transforms.augment_batch(x.float().div_(255), generator, augment)
    elif augment != "none":
        x = transforms.augment_batch(x, generator, augment)
    return transforms.normalize_batch(x, data_config, channels_last)


def class_weights_for(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, scaled so a balanced set gets weight 1 for every class
    (scikit-learn's "balanced"); a class absent from training gets 0 rather than infinity."""
    counts = torch.bincount(labels, minlength=num_classes).double()
    weights = torch.zeros(num_classes, dtype=torch.float64)
    present = counts > 0
    weights[present] = len(labels) / (int(present.sum()) * counts[present])
    return weights.float()


# --------------------------------------------------------------------------- model

def build_model(cfg: TrainConfig, num_classes: int, *, load_pretrained: bool = True) -> tuple[nn.Module, bool]:
    """The model and whether ImageNet weights were loaded.

    Missing weights with ``allow_random_init`` fall back to random init with a loud warning;
    without it the models module's error (which says how to get the weights) propagates.
    """
    from bloodcell_lib.modeling import models

    torch.manual_seed(cfg.seed)  # same initial weights on every rank and every rerun
    kwargs = dict(freeze=cfg.freeze, unfreeze_last=cfg.unfreeze_last)
    if cfg.init_from and load_pretrained:
        model = models.create_model(cfg.model, num_classes, pretrained=False, **kwargs)
        return model, init_from_checkpoint(model, cfg)
    want = bool(cfg.pretrained and load_pretrained)
    try:
        return models.create_model(cfg.model, num_classes, pretrained=want, **kwargs), want
    except models.PretrainedWeightsUnavailable as err:
        if not cfg.allow_random_init:
            raise
        log(f"WARNING: ImageNet weights for '{cfg.model}' are not available ({err}).\n"
            f"WARNING: allow_random_init is true, so '{cfg.model}' is trained from RANDOM "
            "initialisation; expect lower accuracy. This is recorded in run_info.json (pretrained.used = false).")
        torch.manual_seed(cfg.seed)
        return models.create_model(cfg.model, num_classes, pretrained=False, **kwargs), False


def init_from_checkpoint(model: nn.Module, cfg: TrainConfig) -> bool:
    """Load every weight but the classifier head from ``cfg.init_checkpoint`` (transfer from a
    related task, e.g. PBC cells to BCCD cells); return whether that run used ImageNet weights."""
    from bloodcell_lib.modeling import models

    path = cfg.init_checkpoint
    if not path.is_file():
        raise ConfigError(f"parameter 'init_from' = {cfg.init_from!r}: no checkpoint at {path}"
                          + ("" if cfg.init_from.endswith(".pt") else
                             f"; train experiment '{cfg.init_from}' first (run_all.sh orders it before this one)"))
    source = read_checkpoint(path)
    source_config = source.get("config", {})
    source_model = source_config.get("model")
    if source_model != cfg.model:
        raise ConfigError(f"parameter 'init_from' = {cfg.init_from!r}: {path} holds a {source_model!r} model, "
                          f"this experiment builds {cfg.model!r}")
    tested = sources.tested_sources(cfg.to_dict())
    overlapping = [name for name in sources.trained_sources(source_config) if name in tested]
    if overlapping:
        raise ConfigError(f"parameter 'init_from' = {cfg.init_from!r}: {path} was trained on '{overlapping[0]}', "
                          f"which shares images with '{tested[0]}' (its lab), that this run tests on; its training "
                          "images may be this run's test images (leakage). Start from a model of another data set.")
    head = models.head_name(model) + "."
    weights = {k: v for k, v in source["model"].items() if not k.startswith(head)}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not k.startswith(head) for k in missing):
        raise ConfigError(f"parameter 'init_from': {path} does not fit {cfg.model}: "
                          f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    log(f"init_from: weights (all but the head '{head[:-1]}') from {path}, epoch {source.get('epoch')}")
    return bool(source.get("pretrained_used", False))


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"parameter 'freeze' = {cfg.freeze!r} with unfreeze_last = {cfg.unfreeze_last} "
                          "leaves no trainable parameter")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """(scheduler or None, stepped per batch?). OneCycle is defined per step; the others per epoch."""
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs), False
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr,
                                                   total_steps=cfg.epochs * max(1, steps_per_epoch)), True
    if cfg.scheduler == "step":
        # Three decays of 10x spread over the run, as torchvision's StepLR recipe (every 30 of 90).
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, round(cfg.epochs / 3)), gamma=0.1), False
    return None, False


# --------------------------------------------------------------------------- one epoch

def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    loader: Batches, device: torch.device, epoch: int, *, data_config: dict,
                    augment: str = "none", generator: torch.Generator | None = None,
                    channels_last: bool = False, scheduler=None, progress: bool = True,
                    epochs: int | None = None, adapt_frozen_bn: bool = False) -> dict[str, float]:
    """One pass over ``loader``; returns train_loss and train_acc summed over all ranks.
    ``adapt_frozen_bn``: frozen BatchNorm layers normalise with batch statistics and update
    their running statistics (train mode) instead of keeping the pretrained ones (eval mode)."""
    from bloodcell_lib.modeling.models import set_frozen_bn_eval

    model.train()
    if not adapt_frozen_bn:
        set_frozen_bn_eval(model)
    # Sums stay on the device: reading them every step would stall a GPU once per batch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    desc = f"epoch {epoch}" + (f"/{epochs}" if epochs else "") + " train"
    bar = _progress(loader, len(loader), desc, progress and D.is_main())
    for step, (x_uint8, y) in enumerate(bar):
        _test_fault_hook(epoch, step)
        x = _to_model_input(x_uint8, device, data_config, channels_last, augment, generator)
        y = y.to(device, non_blocking=True)
        logits = model(x)
        loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        n = len(y)
        loss_sum += loss.detach().double() * n
        correct += (logits.detach().argmax(1) == y).sum()
        seen += n
        if not bar.disable and (step + 1) % max(1, len(loader) // 8) == 0:  # a few GPU syncs per epoch
            bar.set_postfix(loss=f"{loss_sum.item() / max(seen, 1):.4f}", refresh=False)
    bar.close()
    totals = D.all_reduce(torch.stack([loss_sum.cpu(), correct.cpu(),
                                       torch.tensor(float(seen), dtype=torch.float64)]))
    return {"train_loss": (totals[0] / totals[2].clamp(min=1)).item(),
            "train_acc": (totals[1] / totals[2].clamp(min=1)).item(),
            "train_samples": int(totals[2].item())}


def confusion_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro F1 from a confusion matrix (rows = true class).

    Same definitions as scikit-learn's functions: balanced accuracy averages recall over
    classes present in y_true; macro F1 averages over classes present in y_true or y_pred.
    Working from the confusion matrix lets ranks sum one small tensor instead of gathering
    every prediction.
    """
    cm = confusion.double()
    total = cm.sum()
    tp = cm.diag()
    support = cm.sum(1)
    predicted = cm.sum(0)
    acc = (tp.sum() / total).item() if total > 0 else float("nan")
    has_true = support > 0
    bal = (tp[has_true] / support[has_true]).mean().item() if has_true.any() else float("nan")
    used = has_true | (predicted > 0)
    denom = support + predicted
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1e-12), torch.zeros_like(tp))
    macro_f1 = f1[used].mean().item() if used.any() else float("nan")
    return {"acc": acc, "balanced_acc": bal, "macro_f1": macro_f1}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Batches, device: torch.device, num_classes: int, *,
             data_config: dict, channels_last: bool = False, progress: bool = False,
             desc: str = "val") -> dict[str, Any]:
    """Validation loss and metrics summed over all ranks.

    val_loss is plain cross-entropy (no label smoothing, no class weights) so that it means
    the same in every experiment and can be compared and monitored across them.
    """
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    bar = _progress(loader, len(loader), desc, progress and D.is_main())
    for x_uint8, y in bar:
        x = _to_model_input(x_uint8, device, data_config, channels_last)
        logits = model(x).float()
        y_dev = y.to(device)
        loss_sum += nn.functional.cross_entropy(logits, y_dev, reduction="sum").double().cpu()
        pred, y = logits.argmax(1).cpu(), y.cpu()
        confusion += torch.bincount(y * num_classes + pred, minlength=num_classes ** 2).view(
            num_classes, num_classes).double()
    bar.close()
    packed = D.all_reduce(torch.cat([loss_sum.view(1), confusion.flatten()]))
    loss_sum, confusion = packed[0], packed[1:].view(num_classes, num_classes)
    n = confusion.sum().item()
    scores = confusion_metrics(confusion)
    return {"val_loss": loss_sum.item() / max(n, 1), "val_acc": scores["acc"],
            "val_balanced_acc": scores["balanced_acc"], "val_macro_f1": scores["macro_f1"],
            "val_samples": int(n), "confusion": confusion.long()}


# --------------------------------------------------------------------------- checkpoints

def _py(value: Any) -> Any:
    """Plain Python values, so checkpoints load with torch.load(weights_only=True)."""
    if isinstance(value, dict):
        return {str(k): _py(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_py(v) for v in value) if isinstance(value, tuple) else [_py(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def _check_resumable(cfg: TrainConfig, ckpt: dict[str, Any], class_names: list[str], split_sha: str | None,
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


def _clean_stale_temp_files(run_dir: Path) -> None:
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
    (see _repair_best). History last: it never lists an epoch that has no checkpoint."""
    files = RunDir(run_dir)
    save_checkpoint(checkpoint, files.checkpoint_last)
    if improved:
        atomic_link(files.checkpoint_last, files.checkpoint_best)
    _write_history(run_dir, history)


# --------------------------------------------------------------------------- test hook

_FAULT = os.environ.get("BLOODCELL_TEST_KILL")  # "rank:epoch:step" -> SIGKILL that rank there


def _test_fault_hook(epoch: int, step: int) -> None:
    """Lets the interruption tests kill a process at an exact point; inert unless the
    variable is set."""
    if _FAULT:
        rank, ep, st = (int(v) for v in _FAULT.split(":"))
        if (D.get_rank(), epoch, step) == (rank, ep, st):
            print(f"[test] rank {rank} killing itself (SIGKILL) at epoch {epoch} step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------- data preparation

@dataclass
class PreparedData:
    class_names: list[str]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    split_path: Path
    dropped: Any
    failed: list[tuple[str, str]]
    cache_seconds: float
    train_sources: torch.Tensor | None = None  # each training picture's source, numbered (multi only)


def _split_table(cfg: TrainConfig, manifest, run_dir: Path, fold: int | None) -> pd.DataFrame:
    from bloodcell_lib.data import splits

    return splits.splits_for(cfg, manifest, RunDir(run_dir).split, write=True, fold=fold)


def prepare_data(cfg: TrainConfig, run_dir: Path, fold: int | None, info: D.DistInfo,
                 progress: bool) -> PreparedData:
    """Manifest -> split (saved as run_dir/split.csv) -> uint8 cache of train and val images.

    Test images are left out before anything is decoded: training never reads them.
    """
    from bloodcell_lib.data import cache, datasets, splits

    # Rank 0 reads the data set (which checks every file) and makes and writes the split;
    # the others receive the very same table from it: no repeated scan, and no shared file
    # system needed between nodes.
    payload = None
    if info.is_main:
        manifest = datasets.load_manifest_for(cfg)
        for note in manifest.notes:
            log(f"data note: {note}")
        if manifest.dropped is not None and len(manifest.dropped):
            log(f"data: {len(manifest.dropped)} item(s) left out of '{cfg.dataset}' (listed in run_info.json):")
            for row in manifest.dropped.head(10).itertuples(index=False):
                log(f"  - {row.item}: {row.reason}")
            if len(manifest.dropped) > 10:
                log(f"  ... and {len(manifest.dropped) - 10} more")
        table = _split_table(cfg, manifest, run_dir, fold)
        # A class too small to split (KRD-WBC's one basophil), or too small to score in a held-out
        # lab, is said once here and listed with the dropped items in run_info.json.
        placed = splits.placement_entries(table, test_source=cfg.test_source)
        for row in placed.itertuples(index=False):
            log(f"split note: {row.item}: {row.reason}")
        payload = (list(manifest.classes), table, pd.concat([manifest.dropped, placed], ignore_index=True))
    class_names, table, dropped = D.broadcast_object(payload)
    split_path = RunDir(run_dir).split
    # Everything that is not train or val (test, Kaggle's test_simple) stays untouched.
    used = table[table["split"].isin(["train", "val"])].reset_index(drop=True)
    if not (used["split"] == "train").any():
        raise ValueError(f"{split_path}: no training images")
    if not (used["split"] == "val").any():
        raise ValueError(f"{split_path}: no validation images; early stopping and model choice need val "
                         "(set val_fraction > 0)")

    t0 = time.perf_counter()
    # Rank 0 decodes and stores the cache while the others wait. Then the first process of
    # every other node loads it (shared file system) or builds its own (node-local disk),
    # and only then the remaining processes load it: nobody decodes the same set twice on
    # one machine.
    cached = _build_cache(cache, used, cfg, progress) if info.is_main else None
    D.barrier()
    if not info.is_main and info.local_rank == 0:
        cached = _build_cache(cache, used, cfg, False)
    D.barrier()
    if cached is None:
        cached = _build_cache(cache, used, cfg, False)
    cache_seconds = time.perf_counter() - t0

    failed = [(str(p), str(r)) for p, r in (cached.failed or [])]
    if failed:
        log(f"WARNING: {len(failed)} image(s) could not be decoded and are NOT used (listed in run_info.json):")
        for path, reason in failed[:20]:
            log(f"  - {path}: {reason}")
        if len(failed) > 20:
            log(f"  ... and {len(failed) - 20} more")

    index = {name: i for i, name in enumerate(class_names)}
    labels = torch.tensor([index[label] for label in used["label"]], dtype=torch.long)
    ok = cached.ok.bool()
    is_train = torch.tensor((used["split"] == "train").to_numpy(), dtype=torch.bool) & ok
    is_val = torch.tensor((used["split"] == "val").to_numpy(), dtype=torch.bool) & ok
    images = cached.images
    source_codes = torch.tensor(pd.factorize(used["source"], sort=True)[0], dtype=torch.long)
    return PreparedData(class_names, images[is_train], labels[is_train], images[is_val], labels[is_val],
                        split_path, dropped, failed, cache_seconds, source_codes[is_train])


def _build_cache(cache_module, table: pd.DataFrame, cfg: TrainConfig, progress: bool):
    workers = cfg.num_workers
    if not workers:
        # auto: worker processes pay off only when there is enough to decode to amortise
        # their start-up (each imports torch).
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = min(cores, 8) if len(table) >= 1000 else 0
    kwargs = dict(num_workers=workers, progress=progress)
    if cfg.use_cache:
        return cache_module.load_or_build_cache(table, cfg.image_size, **kwargs)
    # use_cache: false decodes into memory for this run only; nothing is kept under cache/.
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bloodcell-nocache-") as tmp:
        cached = cache_module.load_or_build_cache(table, cfg.image_size, cache_dir=tmp, **kwargs)
        cached.images = cached.images.clone()  # detach from the file before it is deleted
        return cached


# --------------------------------------------------------------------------- fit

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
        from bloodcell_lib.training.calibrate import calibrate_run  # imports this module

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
    state = FitState(cfg, run_dir, fold, info, progress, started, _resumed_checkpoint(cfg, run_dir, info))
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


def _resumed_checkpoint(cfg: TrainConfig, run_dir: Path, info: D.DistInfo) -> dict[str, Any] | None:
    """Decide on rank 0 whether this run continues a checkpoint, then tell the others. A fresh
    run clears an earlier run's files first."""
    files = RunDir(run_dir)
    checkpoint = None
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _clean_stale_temp_files(run_dir)
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
        _check_resumable(cfg, checkpoint, data.class_names, state.split_sha, state.files.checkpoint_last)

    data_config = dict(models.resolve_data_config(cfg.model, cfg.image_size))
    data_config.update(image_size=cfg.image_size, crop=cfg.crop, crop_margin=cfg.crop_margin,
                       crop_window=cfg.crop_window)
    if checkpoint is not None and checkpoint["data_config"].get("color_norm"):
        data_config["color_norm"] = checkpoint["data_config"]["color_norm"]  # resumed: the same reference
    elif cfg.color_norm != "none":
        from bloodcell_lib.data.color_norm import reference

        data_config["color_norm"] = D.broadcast_object(reference(data.train_images) if info.is_main else None)
    state.data_config = _py(data_config)

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
            _repair_best(checkpoint, state.files.checkpoint_last, state.files.checkpoint_best)

    data = state.data
    state.train_labels = data.train_labels
    if info.device.type == "cuda":
        _move_data_to_gpu(data, info.device)
    state.cfg_dict = _py(state.cfg.to_dict())
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
    provenance.write_run_info(state.files.run_info, _py(record))


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
            "history": _py(state.history), "pretrained_used": state.pretrained_used, "split_sha256": state.split_sha,
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


def _move_data_to_gpu(data: PreparedData, device: torch.device, max_fraction: float = 0.3) -> None:
    """Keep the uint8 images on the GPU when they take at most ``max_fraction`` of its free
    memory (15,390 PBC images at 224 px: 2.3 GB): no host-to-device copy per batch."""
    nbytes = data.train_images.numel() + data.val_images.numel()
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes <= max_fraction * free:
        data.train_images, data.val_images = data.train_images.to(device), data.val_images.to(device)
        data.train_labels, data.val_labels = data.train_labels.to(device), data.val_labels.to(device)


def _repair_best(checkpoint: dict, last_path: Path, best_path: Path) -> None:
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
