"""Stain and camera colour augmentation for batches (``augment: stain``), in torch.

Every lab stains, lights and photographs its smears differently: PBC's CellaVision pictures
are beige with dark violet nuclei, LISC's bluish-white, BCCD's grey with pale nuclei. A model
trained on one lab's colours reads another's colour cast as a cell type. This widens the
colours a model sees during training, per picture:

- stain amount: RGB -> optical density -> the three stain concentrations (Ruifrok & Johnston's
  haematoxylin / eosin / DAB vectors, the matrix scikit-image's ``rgb2hed`` uses), each scaled
  by alpha and shifted by beta, and back (HED jitter, Tellez et al. 2018/2019: sigma 0.05
  "light" to 0.2 "strong"; here alpha 1 +- HED_ALPHA, beta +- HED_BETA);
- gamma (camera response), Gaussian blur (focus, optics) and Gaussian noise (sensor).

Brightness, contrast, saturation and hue come from transforms' colour jitter with the
STAIN ranges. Works on floats in [0, 1]; all random numbers are drawn up front from one
generator in a fixed order, so one seed gives the same batch on any device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

HED_ALPHA = 0.2  # stain concentration scaled by 1 +- this
HED_BETA = 0.04  # and shifted by +- this (optical density units)
GAMMA = 1.35  # gamma drawn log-uniformly in [1 / GAMMA, GAMMA]
BLUR_SIGMA = 1.0  # blur sigma drawn in [0, this] pixels
NOISE_STD = 0.02  # noise standard deviation drawn in [0, this]
# Rows: the optical density (R, G, B) of one unit of haematoxylin, eosin and DAB.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
DARKEST = 1 / 255  # optical density of black is infinite; clamp at one uint8 step


def hed_jitter(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Each picture's stain concentrations times ``alpha`` [N, 3] plus ``beta`` [N, 3]."""
    # density' = ((density @ H) * alpha + beta) @ R: one 3x3 matrix and offset per picture.
    hed, rgb = HED_FROM_RGB.to(x.device), RGB_FROM_HED.to(x.device)
    matrix = (hed * alpha[:, None, :]) @ rgb  # [N, 3, 3], acting on row vectors
    offset = beta @ rgb  # [N, 3]
    n, c, h, w = x.shape
    density = -torch.log(x.clamp(min=DARKEST)).reshape(n, c, h * w)
    density = torch.baddbmm(offset[:, :, None], matrix.transpose(1, 2), density)
    return torch.exp(density.neg_()).clamp_(0, 1).reshape(n, c, h, w)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each picture blurred with its own ``sigma`` [N] (pixels; 0 leaves it as it is)."""
    radius = max(1, math.ceil(2 * float(sigma.max()))) if len(sigma) else 1
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-offsets.square() / (2 * sigma.clamp(min=1e-3)[:, None].square()))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(x.shape[1], dim=0)  # [N*C, K]
    n, c, h, w = x.shape
    flat = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * c)
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * c)
    return flat.reshape(n, c, h, w)


def stain_jitter(x: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """HED jitter, gamma, blur and noise on a float batch [N, 3, H, W] in [0, 1]; every range
    scaled by ``strength`` (0: the batch itself)."""
    if strength == 0:
        return x
    n, draw = len(x), {"generator": generator, "device": generator.device}
    u = torch.rand((n, 9), **draw).to(x.device)
    alpha = 1 + strength * HED_ALPHA * (2 * u[:, 0:3] - 1)
    beta = strength * HED_BETA * (2 * u[:, 3:6] - 1)
    gamma = torch.exp(strength * math.log(GAMMA) * (2 * u[:, 6] - 1))
    noise = torch.randn(x.shape, **draw).to(x.device) * (strength * NOISE_STD * u[:, 8]).view(n, 1, 1, 1)
    y = hed_jitter(x, alpha, beta).pow(gamma.view(n, 1, 1, 1))
    return (gaussian_blur(y, strength * BLUR_SIGMA * u[:, 7]) + noise).clamp_(0, 1)
