"""Few-shot adaptation: fine-tune a trained model on a handful of one lab's labelled cells.

The recipe, for 5-10 cells per class: BatchNorm statistics re-estimated on the adaptation
cells first (``modeling.adaptation``), then a few epochs at a low learning rate of the
head plus the last ``unfreeze_last`` stages, with strong augmentation (flips, rotations,
resized crops, colour jitter), through ``loop.train_one_epoch``. With so few cells there
is no validation set, so no epoch is chosen: the last one is kept.

The adapted checkpoint keeps the parent's class names (classes the lab has no cells of stay
as they were learnt) and the checkpoint dict contract, with ``config["adapted_from"]``
naming the parent, the recipe and every cell used. The ``adapt`` command and the few-shot
study (files in, files out) are in ``evaluation.few_shot``.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from bloodcell_lib.core import distributed as D
from bloodcell_lib.modeling.loaded import LoadedModel
from bloodcell_lib.training.config import ConfigError, make_config
from bloodcell_lib.training.data_loading import Batches
from bloodcell_lib.training.loop import train_one_epoch
from bloodcell_lib.training.optim import build_optimizer, build_scheduler


class AdaptError(ValueError):
    """Adaptation input that cannot be used; the message names the parameter or folder."""


@dataclass
class AdaptRecipe:
    """How a checkpoint is fine-tuned on a lab's few cells (see the module docstring)."""

    epochs: int = 12
    # 12 epochs of 5-10 cells per class are only 12-24 steps: at 3e-4 the quick PBC model
    # reached 0.82 balanced accuracy on LISC with 10 cells per class, at 1e-3 0.91
    # (development numbers, docs/adapting.md).
    lr: float = 1e-3
    unfreeze_last: int = 2
    augment: str = "strong"
    batch_size: int = 32
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    adapt_bn: bool = True
    seed: int = 0

    def check(self) -> "AdaptRecipe":
        for name in ("epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise AdaptError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise AdaptError(f"lr must be > 0, got {self.lr!r}")
        if self.unfreeze_last < 0:
            raise AdaptError(f"unfreeze_last must be >= 0, got {self.unfreeze_last!r}")
        return self


# --------------------------------------------------------------------------- drawing cells

def draw_cells(table: pd.DataFrame, k: int, seed: int) -> np.ndarray:
    """Row positions of at least ``k`` cells per class, taken as whole leakage groups
    (column ``group``; each row its own group without one) in a seeded order per class.

    The order of one seed is fixed, so a smaller k takes a prefix of a larger k's cells:
    every k of one seed can be scored on the same remaining cells. A class with fewer
    than k cells gives all of them.
    """
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 0:
        raise AdaptError(f"k (cells per class) must be an integer >= 0, got {k!r}")
    groups = table["group"].astype(str) if "group" in table else pd.Series(range(len(table))).astype(str)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for label in sorted(table["label"].unique()):
        rows = np.flatnonzero((table["label"] == label).to_numpy())
        order = list(dict.fromkeys(groups.iloc[rows]))
        taken = 0
        for group in rng.permutation(np.array(order, dtype=object)):
            if taken >= k:
                break
            members = rows[(groups.iloc[rows] == group).to_numpy()]
            chosen.extend(members.tolist())
            taken += len(members)
    return np.array(sorted(chosen), dtype=int)


def label_indices_for(labels: pd.Series, class_names: list[str], where: str) -> torch.Tensor:
    """Parent-model class index of every label; AdaptError naming unknown classes."""
    unknown = sorted(set(labels) - set(class_names))
    if unknown:
        raise AdaptError(f"{where}: class(es) {', '.join(unknown)} are not classes of the checkpoint "
                         f"({', '.join(class_names)}); rename or remove those folders")
    index = {name: i for i, name in enumerate(class_names)}
    return torch.tensor([index[label] for label in labels], dtype=torch.long)


# --------------------------------------------------------------------------- fine-tuning

def _optimizer_config(recipe: AdaptRecipe, model_name: str):
    try:
        return make_config(model=model_name, optimizer="adamw", lr=recipe.lr, weight_decay=recipe.weight_decay,
                           epochs=recipe.epochs, scheduler="cosine", freeze="backbone",
                           unfreeze_last=recipe.unfreeze_last, augment=recipe.augment, seed=recipe.seed)
    except ConfigError as err:
        raise AdaptError(str(err)) from err


def fine_tune(loaded: LoadedModel, images_uint8: torch.Tensor, labels: torch.Tensor,
              recipe: AdaptRecipe) -> list[dict[str, float]]:
    """Adapt ``loaded.model`` in place to the cells ``images_uint8`` (uint8 [N, 3, S, S]) with parent
    class indices ``labels``; returns the per-epoch train loss/accuracy. Leaves eval mode."""
    from bloodcell_lib.modeling.adaptation import adapt_batchnorm
    from bloodcell_lib.modeling.models import set_trainable

    model = loaded.model
    recipe.check()
    if len(images_uint8) != len(labels) or len(labels) < 2:
        raise AdaptError(f"need at least 2 labelled cells (images and labels alike), got {len(labels)}")
    if recipe.adapt_bn:
        adapt_batchnorm(loaded, images_uint8)
    cfg = _optimizer_config(recipe, loaded.model_name)
    try:
        set_trainable(model, "backbone", recipe.unfreeze_last)
    except ValueError as err:
        raise AdaptError(f"unfreeze_last: {err}") from err
    optimizer = build_optimizer(cfg, model)
    scheduler, _ = build_scheduler(cfg, optimizer, 1)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    device = next(model.parameters()).device
    history = []
    for epoch in range(1, recipe.epochs + 1):
        torch.manual_seed(recipe.seed * 1_000 + epoch)  # dropout
        order = torch.randperm(len(labels), generator=D.epoch_generator(recipe.seed, epoch, stream=0))
        loader = Batches(images_uint8, labels, order, recipe.batch_size)
        stats = train_one_epoch(model, criterion, optimizer, loader, device, epoch, data_config=loaded.data_config,
                                augment=recipe.augment, generator=D.epoch_generator(recipe.seed, epoch, stream=1),
                                channels_last=loaded.channels_last, progress=False)
        scheduler.step()
        history.append({"epoch": epoch, "train_loss": stats["train_loss"], "train_acc": stats["train_acc"]})
    model.eval()
    return history


# --------------------------------------------------------------------------- a lab's folder

def load_lab_cells(folder: str | os.PathLike, loaded: LoadedModel, *, k: int | None, seed: int):
    """(table of the cells used, their uint8 images, notes) from a folder per class, read with the
    checkpoint's crop and size. ``k``: cells per class drawn (whole groups), None: all."""
    from bloodcell_lib.data.cache import load_or_build_cache
    from bloodcell_lib.data.datasets import load_manifest

    config = loaded.data_config
    crop = config.get("crop") if config.get("crop") in ("stain", "nucleus", "window") else None
    try:
        manifest = load_manifest("folder", folder, crop=crop, margin=float(config.get("crop_margin", 0.15)),
                                 window=int(config.get("crop_window", 200)))
    except (OSError, ValueError) as err:
        raise AdaptError(f"--folder {folder}: {err}") from err
    # Every class folder, even one whose pictures were all dropped, must be a class of the model.
    class_folders = [d.name for d in manifest.root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    label_indices_for(pd.Series(class_folders, dtype=str), loaded.class_names, f"--folder {folder}")
    notes = list(manifest.notes) + [f"skipped {row.item}: {row.reason}" for row in manifest.dropped.itertuples()]
    table = manifest.table
    if table.empty:
        raise AdaptError(f"--folder {folder}: no readable cell picture in any class folder")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise AdaptError(f"--k must be an integer >= 1 (cells per class), got {k!r}")
        counts = table["label"].value_counts()
        notes += [f"class {label}: only {n} cell(s), fewer than k = {k}; all used" for label, n in counts.items() if n < k]
        table = table.iloc[draw_cells(table, k, seed)].reset_index(drop=True)
    cached = load_or_build_cache(table, loaded.image_size, num_workers=0, progress=False)
    notes += [f"skipped {path}: {reason}" for path, reason in cached.failed]
    ok = cached.ok.numpy()
    return table[ok].reset_index(drop=True), cached.images[torch.from_numpy(ok)], notes


def adapted_checkpoint(parent: dict[str, Any], model: nn.Module, record: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint dict of an adapted model: the parent's, with new weights, no optimizer
    state and ``config["adapted_from"] = record``. The parent's feature bank is dropped: its
    features came from the parent's weights, so the review flags fall back to energy."""
    ckpt = {key: value for key, value in parent.items()
            if key not in ("optimizer", "scheduler", "history", "feature_bank")}
    ckpt.update(model=copy.deepcopy(model.state_dict()), optimizer=None, scheduler=None, best_metric=None,
                config={**dict(parent.get("config") or {}), "adapted_from": record},
                rng_state=torch.get_rng_state())
    return ckpt
