"""Optimizer, learning-rate schedule and the loss's class weights for a run's config."""
from __future__ import annotations

import torch
import torch.nn as nn

from bloodcell_lib.training.config import ConfigError, TrainConfig


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


def class_weights_for(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, scaled so a balanced set gets weight 1 for every class
    (scikit-learn's "balanced"); a class absent from training gets 0 rather than infinity."""
    counts = torch.bincount(labels, minlength=num_classes).double()
    weights = torch.zeros(num_classes, dtype=torch.float64)
    present = counts > 0
    weights[present] = len(labels) / (int(present.sum()) * counts[present])
    return weights.float()
