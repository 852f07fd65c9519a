"""The manifest one run's settings select: a single data set (datasets: with dropped classes,
a per-class subset and another set's training-only images) or several labs (multisource).

It sits above both loaders, so neither imports the other. The settings arrive as any object
with the fields of ``DataSettings`` (training.config.TrainConfig has them): data never
imports training.
"""
from __future__ import annotations

from typing import Protocol, Sequence

from bloodcell_lib.data.catalog import Manifest
from bloodcell_lib.data.datasets import drop_classes, load_manifest, subset_per_class, with_extra_training_images
from bloodcell_lib.data.multisource import load_multi


class DataSettings(Protocol):
    """The settings that decide a run's manifest (TrainConfig's fields of the same names)."""

    dataset: str
    data_dir: str | None
    csv_path: str | None
    crop: str
    crop_margin: float
    crop_window: int
    drop_classes: Sequence[str]
    subset_per_class: int
    extra_train: str | None
    extra_train_per_class: int
    sources: Sequence[str]
    test_source: str | None
    source_per_class: int
    test_source_per_class: int
    seed: int


def load_manifest_for(cfg: DataSettings) -> Manifest:
    """The manifest a training config asks for: data set, crop, dropped classes, subset, and
    training-only images of another set (``extra_train``); ``multi``: see multisource."""
    if cfg.dataset == "multi":
        caps = [cap for cap in (cfg.source_per_class, cfg.subset_per_class) if cap]
        test_caps = [cap for cap in (cfg.test_source_per_class, cfg.subset_per_class) if cap]
        return load_multi(list(cfg.sources), crop=cfg.crop, margin=cfg.crop_margin, per_class=min(caps, default=0),
                          seed=cfg.seed, held_out=cfg.test_source, held_out_per_class=min(test_caps, default=0))
    manifest = load_manifest(cfg.dataset, cfg.data_dir, crop=cfg.crop, margin=cfg.crop_margin,
                             window=cfg.crop_window, csv_path=cfg.csv_path)
    if cfg.drop_classes:
        manifest = drop_classes(manifest, list(cfg.drop_classes))
    if cfg.subset_per_class:
        manifest = subset_per_class(manifest, cfg.subset_per_class, seed=cfg.seed)
    if cfg.extra_train:
        caps = [cap for cap in (cfg.extra_train_per_class, cfg.subset_per_class) if cap]
        manifest = with_extra_training_images(manifest, cfg.extra_train, per_class=min(caps, default=0),
                                              crop=cfg.crop, margin=cfg.crop_margin, seed=cfg.seed)
    return manifest
