"""BatchNorm re-estimation on one lab's unlabelled cells (AdaBN, Li et al. 2016).

A model trained on one lab's smears sees another lab's colour cast and scale as a shift of
its feature statistics; BatchNorm layers normalise with the training lab's running means and
variances, so every later layer gets inputs it never saw. Replacing those statistics by the
new lab's (forward passes only, no labels, no gradient) undoes much of the shift while every
learned weight stays as it was.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

_BatchNorm = nn.modules.batchnorm._BatchNorm


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer that keeps running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, meta: dict[str, Any], images_uint8: Any, *,
                    batch_size: int = 64) -> dict[str, int]:
    """Replace the running mean/variance of every BatchNorm layer of ``model`` (in place) by
    the statistics of ``images_uint8`` (uint8 [N, 3, S, S], as ``transforms.pil_to_uint8``
    makes them; ``meta`` from ``predict.load_checkpoint``). Returns {n_images, n_layers}.

    Only the BatchNorm layers run in train mode (dropout and everything else stay in eval);
    momentum None makes each layer keep the cumulative average over all batches, so the
    result does not depend on batch order. Weights and biases are never touched.
    """
    from bloodcell_lib.data.transforms import normalize_batch

    x_all = torch.as_tensor(images_uint8)
    if x_all.ndim != 4 or x_all.shape[1] != 3 or x_all.dtype != torch.uint8:
        raise ValueError(f"adaptation images must be uint8 [N, 3, S, S]; got {x_all.dtype} {tuple(x_all.shape)}")
    if len(x_all) < 2:
        raise ValueError(f"BatchNorm adaptation needs at least 2 images (a variance), got {len(x_all)}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 for BatchNorm adaptation, got {batch_size}")
    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer to adapt")
    was_training = model.training
    momenta = [layer.momentum for layer in layers]
    model.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
        layer.train()
    device = next(model.parameters()).device
    # A last batch of one image has no variance: fold it into the batch before.
    starts = list(range(0, len(x_all), batch_size))
    if len(x_all) - starts[-1] == 1 and len(starts) > 1:
        starts.pop()
    try:
        for i, start in enumerate(starts):
            stop = starts[i + 1] if i + 1 < len(starts) else len(x_all)
            x = x_all[start:stop].to(device)
            model(normalize_batch(x, meta["data_config"], meta.get("channels_last", False)))
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.train(was_training)
    return {"n_images": int(len(x_all)), "n_layers": len(layers)}
