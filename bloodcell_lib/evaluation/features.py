"""Logits and penultimate-layer features of a checkpoint's model on uint8 cell images.

The features are what the k-NN review score compares (``modeling.neighbours.logits_and_features``:
the input of the classifier, taken by a hook), computed on the images as ``predict`` prepares
them (``pictures._load_one``: the checkpoint's crop and size; ``transforms.normalize_batch``:
its colour normalisation and mean/std). ``suggest`` clusters them; ``adapt --labels`` builds
the lab's k-NN feature bank from them.
"""
from __future__ import annotations

import numpy as np
import torch

from bloodcell_lib.data.transforms import normalize_batch
from bloodcell_lib.modeling.loaded import LoadedModel
from bloodcell_lib.modeling.neighbours import logits_and_features


@torch.inference_mode()
def logits_features(loaded: LoadedModel, images_uint8: torch.Tensor, *,
                    batch_size: int = 64) -> tuple[np.ndarray, torch.Tensor]:
    """(raw logits float32 [N, K], features float32 [N, D]) of uint8 images [N, 3, S, S]."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = loaded.model
    was_training = model.training
    device = next(model.parameters()).device
    logits, features = [], []
    model.eval()
    try:
        for start in range(0, len(images_uint8), batch_size):
            x = normalize_batch(images_uint8[start:start + batch_size].to(device), loaded.data_config,
                                loaded.channels_last)
            out, feat = logits_and_features(model, x)
            logits.append(out.float().cpu())
            features.append(feat.float().cpu())
    finally:
        model.train(was_training)
    k = len(loaded.class_names)
    if not logits:
        return np.zeros((0, k), dtype=np.float32), torch.zeros((0, 0))
    return torch.cat(logits).numpy(), torch.cat(features)
