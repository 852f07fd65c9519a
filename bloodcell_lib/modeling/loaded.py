"""A model ready to classify: the network and everything read with it (class names, input
contract, calibration, review thresholds, feature bank) as one typed object, ``LoadedModel``.

``load_checkpoint`` makes one from a ``.pt`` checkpoint; ``evaluation.export.read_onnx`` makes
one (without the network, which lives in the ONNX graph) from an exported file. Every stage
that uses a trained model (prediction, evaluation, adaptation, Grad-CAM) takes this object.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bloodcell_lib.modeling.checkpoint import CheckpointError, read_checkpoint

# Training crops that new pictures must get too (``evaluation.pictures.crop_like_training``).
CROPPING_MODES = ("stain", "nucleus", "cell", "window")


@dataclass(frozen=True)
class LoadedModel:
    """``model``: the network (eval mode, on ``device``); None when read from an exported ONNX
    file, whose graph runs in its engine. ``data_config``: mean, std, image_size, crop, ...
    (the input contract); ``config``: the TrainConfig dict ({} for ONNX). ``calibration``,
    ``review``, ``conformal``: the checkpoint's entries (review and conformal None when not
    ``calibrated``: their thresholds assume calibrated probabilities); ``temperature``: what the
    logits are divided by (1.0 uncalibrated). ``feature_bank``: the k-NN OOD score's training
    features (modeling.neighbours), None without (and for ONNX, where it is inside the graph).

    Frozen: a variant (another calibration, no colour normalisation) is made with
    ``dataclasses.replace``; the network itself is adapted in place.
    """

    model: torch.nn.Module | None
    class_names: list[str]
    data_config: dict[str, Any]
    image_size: int
    path: str = ""
    model_name: str | None = None
    channels_last: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    epoch: int | None = None
    best_metric: float | None = None
    device: str = "cpu"
    opset: int | None = None  # the ONNX opset of an exported file, None for a checkpoint
    feature_bank: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    calibrated: bool = False
    review: dict[str, Any] | None = None
    conformal: dict[str, Any] | None = None
    temperature: float = 1.0

    @property
    def ood_score_name(self) -> str:
        """The OOD score of the review flags ("knn" or "energy"; energy without flags)."""
        return (self.review or {}).get("ood_score", "energy")

    @property
    def crop(self) -> str | None:
        """The training crop new pictures get too (one of CROPPING_MODES), None for whole pictures."""
        crop = self.data_config.get("crop")
        return crop if crop in CROPPING_MODES else None

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated softmax (float32) of logits [..., K] with this model's temperature."""
        from bloodcell_lib.modeling.calibration import softmax

        return softmax(logits, self.temperature).astype(np.float32)


def image_size_of(data_config: dict[str, Any], config: dict[str, Any] | None = None) -> int:
    """Square input size from a data config (image_size, or input_size (C, H, W)), else the train config."""
    if data_config.get("image_size"):
        return int(data_config["image_size"])
    size = data_config.get("input_size")
    if size:
        return int(size[-1]) if isinstance(size, (list, tuple)) else int(size)
    if config and config.get("image_size"):
        return int(config["image_size"])
    raise ValueError("data_config names no image_size or input_size")


def load_checkpoint(path: str | os.PathLike, device: str = "cpu", *, calibrated: bool = True) -> LoadedModel:
    """Rebuild the model of a checkpoint (eval mode, on ``device``) with what travels with it.
    ``calibrated=False``: raw softmax probabilities (temperature 1.0, no review or conformal)."""
    from bloodcell_lib.modeling.models import create_model

    path = Path(path)
    ckpt = read_checkpoint(path, device)
    config = dict(ckpt.get("config") or {})
    class_names = [str(c) for c in ckpt["class_names"]]
    try:
        data_config = dict(ckpt["data_config"])
        image_size = image_size_of(data_config, config)
        for key in ("mean", "std"):
            if len(data_config[key]) != 3:
                raise ValueError(f"data_config {key} must have 3 values")
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: unusable data_config {ckpt['data_config']!r} ({err})") from err
    data_config.setdefault("image_size", image_size)
    try:
        model = create_model(ckpt["model_name"], len(class_names), pretrained=False)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot rebuild model {ckpt['model_name']!r}: {err}") from err
    try:
        model.load_state_dict(ckpt["model"])
    except Exception as err:
        detail = "; ".join(line.strip() for line in str(err).strip().splitlines()[:3] if line.strip())
        raise CheckpointError(f"{path}: weights do not fit model {ckpt['model_name']!r} with "
                              f"{len(class_names)} classes ({detail[:400]})") from err
    channels_last = bool(config.get("channels_last", False))
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.eval()
    return LoadedModel(
        model=model, path=str(path), class_names=class_names, model_name=ckpt["model_name"],
        data_config=data_config, image_size=image_size, channels_last=channels_last, config=config,
        epoch=ckpt.get("epoch"), best_metric=ckpt.get("best_metric"), device=str(device),
        feature_bank=ckpt.get("feature_bank"),
        **calibration_fields(ckpt.get("calibration"), ckpt.get("review"), ckpt.get("conformal"), calibrated,
                             ckpt.get("feature_bank") is not None))


def calibration_fields(calibration: dict | None, review: dict | None, conformal: dict | None, calibrated: bool,
                       knn_available: bool) -> dict[str, Any]:
    """The LoadedModel fields that say how probabilities are made: calibration and review (the model's
    entries), calibrated (bool) and temperature (1.0 uncalibrated); the same for a checkpoint and an ONNX file.
    A review that flags by the k-NN score falls back to energy where the model has no feature bank."""
    from bloodcell_lib.modeling.calibration import temperature_of
    from bloodcell_lib.modeling.review import OOD_SCORE, with_score

    if review and review.get("ood_score") == "knn" and not knn_available:
        review = with_score(review, OOD_SCORE)
    return {"calibration": calibration, "calibrated": bool(calibrated and calibration),
            # both thresholds assume calibrated probabilities
            "review": review if calibrated else None, "conformal": conformal if calibrated else None,
            "temperature": temperature_of(calibration) if calibrated else 1.0}
