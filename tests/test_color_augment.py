"""Stain and camera colour augmentation (augment: stain)."""
from __future__ import annotations

import torch

from bloodcell_lib.data import color_augment as ca
from bloodcell_lib.data import transforms as tr


def _batch(n=8, size=24, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_stain_level_keeps_shape_dtype_and_range():
    x = _batch()
    y = tr.augment_batch(x, _gen(), "stain")
    assert y.dtype == torch.uint8 and y.shape == x.shape
    yf = tr.augment_batch(x.float() / 255, _gen(), "stain")
    assert yf.dtype == torch.float32 and yf.shape == x.shape and 0 <= yf.min() and yf.max() <= 1


def test_stain_level_is_deterministic_under_a_seed():
    x = _batch()
    assert torch.equal(tr.augment_batch(x, _gen(5), "stain"), tr.augment_batch(x, _gen(5), "stain"))
    assert not torch.equal(tr.augment_batch(x, _gen(5), "stain"), tr.augment_batch(x, _gen(6), "stain"))


def test_stain_jitter_changes_colour_per_picture():
    # one flat violet picture copied 8 times: every copy ends with its own mean colour
    x = torch.tensor([0.55, 0.35, 0.75]).view(1, 3, 1, 1).expand(8, 3, 16, 16).contiguous()
    y = ca.stain_jitter(x, _gen())
    means = y.mean((-2, -1))
    assert (means - x.mean((-2, -1))).abs().max() > 0.03
    assert torch.cdist(means, means).fill_diagonal_(1).min() > 1e-3


def test_zero_strength_and_neutral_stain_factors_are_the_identity():
    x = _batch().float() / 255
    assert ca.stain_jitter(x, _gen(), strength=0) is x
    bright = x.clamp(min=ca.DARKEST)
    same = ca.hed_jitter(bright, torch.ones(len(x), 3), torch.zeros(len(x), 3))
    assert (same - bright).abs().max() < 1e-4
    assert (ca.gaussian_blur(x, torch.zeros(len(x))) - x).abs().max() < 1e-5


def test_more_haematoxylin_darkens_and_blues_a_picture():
    x = torch.full((1, 3, 4, 4), 0.7)
    y = ca.hed_jitter(x, torch.tensor([[1.5, 1.0, 1.0]]), torch.zeros(1, 3))
    assert (y < x).all() and y[0, 2].mean() > y[0, 0].mean()  # haematoxylin absorbs red most


def test_blur_smooths_and_keeps_the_mean():
    x = _batch(2, 32).float() / 255
    y = ca.gaussian_blur(x, torch.tensor([1.0, 0.0]))
    assert y[0].std() < 0.7 * x[0].std() and (y[1] - x[1]).abs().max() < 1e-5
    assert abs(float(y[0].mean() - x[0].mean())) < 0.01
