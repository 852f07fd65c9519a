"""A run's data: manifest -> split.csv -> uint8 cache of the train and val images, and the
batches sliced from it (normalised and augmented on the device by ``to_model_input``).

Images are decoded and resized once into a uint8 tensor cache (data/cache.py); batches are
sliced from it, augmented with tensor ops and normalised on the fly. No DataLoader workers:
on a few CPU cores decoding JPEGs every epoch costs more than the model does.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from bloodcell_lib.core import distributed as D
from bloodcell_lib.modeling.rundir import RunDir
from bloodcell_lib.training.config import TrainConfig
from bloodcell_lib.training.console import log


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


def to_model_input(x_uint8: torch.Tensor, device: torch.device, data_config: dict, channels_last: bool,
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
    from bloodcell_lib.data import cache, selection, splits

    # Rank 0 reads the data set (which checks every file) and makes and writes the split;
    # the others receive the very same table from it: no repeated scan, and no shared file
    # system needed between nodes.
    payload = None
    if info.is_main:
        manifest = selection.load_manifest_for(cfg)
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


def move_data_to_gpu(data: PreparedData, device: torch.device, max_fraction: float = 0.3) -> None:
    """Keep the uint8 images on the GPU when they take at most ``max_fraction`` of its free
    memory (15,390 PBC images at 224 px: 2.3 GB): no host-to-device copy per batch."""
    nbytes = data.train_images.numel() + data.val_images.numel()
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes <= max_fraction * free:
        data.train_images, data.val_images = data.train_images.to(device), data.val_images.to(device)
        data.train_labels, data.val_labels = data.train_labels.to(device), data.val_labels.to(device)
