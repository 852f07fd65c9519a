"""The model a run starts from: ImageNet weights, random init (allow_random_init), or every
weight but the head of another run's checkpoint (init_from, refused when it could leak test images)."""
from __future__ import annotations

import torch
import torch.nn as nn

from bloodcell_lib.data import sources
from bloodcell_lib.modeling.checkpoint import read_checkpoint
from bloodcell_lib.training.config import ConfigError, TrainConfig
from bloodcell_lib.training.console import log


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
