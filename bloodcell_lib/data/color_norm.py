"""Colour normalisation at load time: Reinhard et al. (2001) colour transfer in CIE L*a*b*.

Each picture's L*, a* and b* channels are shifted and scaled to a reference mean and standard
deviation, so a lab whose stain is bluer, paler or darker reaches the model with the colour
statistics of the training pictures. The reference is the average of the training pictures'
own per-picture statistics (``reference``), fixed when the run starts and stored in the
checkpoint's ``data_config["color_norm"]``; ``transforms.normalize_batch`` applies it to
every batch (training after augmentation, validation, evaluation, predict, every engine),
so one rule holds everywhere and needs no picture of the new lab.

The sRGB <-> L*a*b* conversion (D65 white, 2 degree observer) is written in torch so that it
runs on the batch where it already is (CPU or GPU) and inside the one preprocessing function.
"""
from __future__ import annotations

from typing import Any

import torch

METHODS = ("none", "reinhard")
_RGB_TO_XYZ = torch.tensor([[0.412453, 0.357580, 0.180423],
                            [0.212671, 0.715160, 0.072169],
                            [0.019334, 0.119193, 0.950227]])
_WHITE = torch.tensor([0.950456, 1.0, 1.088754])
_DELTA = 6.0 / 29.0
# Below this many per-mille of L* (a flat grey picture) a channel's spread is not scaled up.
MIN_STD = 1e-3


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1], [N, 3, H, W] -> L*a*b* (L in 0..100)."""
    c = rgb.clamp(0, 1)
    linear = torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = torch.einsum("ij,njhw->nihw", _RGB_TO_XYZ.to(rgb), linear) / _WHITE.to(rgb).view(1, 3, 1, 1)
    f = torch.where(xyz > _DELTA ** 3, xyz.clamp_min(1e-12) ** (1 / 3), xyz / (3 * _DELTA ** 2) + 4 / 29)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """L*a*b* [N, 3, H, W] -> sRGB in [0, 1] (out-of-gamut colours clipped)."""
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], dim=1)
    xyz = torch.where(f > _DELTA, f ** 3, 3 * _DELTA ** 2 * (f - 4 / 29)) * _WHITE.to(lab).view(1, 3, 1, 1)
    linear = torch.einsum("ij,njhw->nihw", torch.linalg.inv(_RGB_TO_XYZ).to(lab), xyz).clamp(0, 1)
    return torch.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055).clamp(0, 1)


def _stats(lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = lab.flatten(2)
    return flat.mean(dim=2), flat.std(dim=2)


def reference(images: torch.Tensor, batch_size: int = 256) -> dict[str, Any]:
    """The ``data_config["color_norm"]`` entry of a run: the mean of its training pictures'
    per-picture L*a*b* means and standard deviations (``images``: uint8 [N, 3, S, S])."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        mean, std = _stats(rgb_to_lab(images[start:start + batch_size].float() / 255))
        means.append(mean)
        stds.append(std)
    if not means:
        raise ValueError("color_norm: reinhard needs at least one training picture for its reference")
    return {"method": "reinhard", "lab_mean": [round(float(v), 4) for v in torch.cat(means).mean(0)],
            "lab_std": [round(float(v), 4) for v in torch.cat(stds).mean(0)], "n": int(len(images))}


def reinhard(rgb: torch.Tensor, entry: dict[str, Any]) -> torch.Tensor:
    """Each picture of the float sRGB batch [N, 3, H, W] (0..1) moved to ``entry``'s L*a*b*
    mean and standard deviation, back in sRGB 0..1."""
    lab = rgb_to_lab(rgb)
    mean, std = _stats(lab)
    target_mean = torch.tensor(entry["lab_mean"], dtype=lab.dtype, device=lab.device).view(1, 3, 1, 1)
    target_std = torch.tensor(entry["lab_std"], dtype=lab.dtype, device=lab.device).view(1, 3, 1, 1)
    scaled = (lab - mean[..., None, None]) / std.clamp_min(MIN_STD)[..., None, None]
    return lab_to_rgb(scaled * target_std + target_mean)
