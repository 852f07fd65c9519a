"""transforms: the shared resize, normalisation, batch augmentation, TTA views, PIL pipeline."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bloodcell_lib.data import transforms as tr

CFG = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "input_size": (3, 16, 16),
       "interpolation": "bilinear"}


def _batch(n=32, size=16, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_pil_to_uint8_resizes_the_whole_image_to_a_square():
    # left half red, right half blue, non-square and grayscale-free: the whole field survives
    array = np.zeros((30, 40, 3), dtype=np.uint8)
    array[:, :20, 0] = 255
    array[:, 20:, 2] = 255
    x = tr.pil_to_uint8(Image.fromarray(array), 16)
    assert x.dtype == torch.uint8 and x.shape == (3, 16, 16)
    assert (x[0, :, :7] == 255).all() and (x[2, :, :7] == 0).all()
    assert (x[2, :, 9:] == 255).all() and (x[0, :, 9:] == 0).all()


def test_pil_to_uint8_accepts_other_modes():
    x = tr.pil_to_uint8(Image.new("L", (10, 10), 77), 8)
    assert x.shape == (3, 8, 8) and (x == 77).all()


def test_normalize_batch_uint8_and_float_agree_and_input_is_kept():
    x = _batch(4)
    original = x.clone()
    y = tr.normalize_batch(x, CFG, channels_last=True)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
    expected = (x.float() / 255 - torch.tensor(CFG["mean"]).view(1, 3, 1, 1)) / torch.tensor(CFG["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(y, expected)
    xf = x.float() / 255
    torch.testing.assert_close(tr.normalize_batch(xf, CFG, channels_last=False), expected)
    assert torch.equal(x, original) and torch.equal(xf, original.float() / 255)
    assert tr.normalize_batch(x, CFG, channels_last=False).is_contiguous()


def _which_views(x, y):
    """For each sample, the dihedral element(s) that map x[i] to y[i]."""
    return [[k for k in range(8) if torch.equal(tr.dihedral(x[i], k), y[i])] for i in range(len(x))]


def test_light_augment_applies_one_exact_dihedral_view_per_sample():
    x = _batch(64)
    y = tr.augment_batch(x, _gen(), "light")
    assert y.dtype == torch.uint8 and y.shape == x.shape
    views = _which_views(x, y)
    assert all(len(v) == 1 for v in views)  # random images have no symmetry
    assert len({v[0] for v in views}) == 8  # per-sample randomness, every element used


def test_augment_is_reproducible_from_the_generator():
    x = _batch()
    for level in ("light", "strong"):
        assert torch.equal(tr.augment_batch(x, _gen(3), level), tr.augment_batch(x, _gen(3), level))
        assert not torch.equal(tr.augment_batch(x, _gen(3), level), tr.augment_batch(x, _gen(4), level))


def test_strong_augment_changes_geometry_and_colour_within_range():
    x = _batch(16, size=32)
    y = tr.augment_batch(x, _gen(), "strong")
    assert y.dtype == torch.uint8 and y.shape == x.shape
    assert all(not v for v in _which_views(x, y))  # more than a flip or rotation
    xf = x.float() / 255
    yf = tr.augment_batch(xf, _gen(), "strong")
    assert yf.dtype == torch.float32 and 0 <= yf.min() and yf.max() <= 1
    assert (yf * 255 - y.float()).abs().max() <= 0.5 + 1e-3  # same draws for uint8 and float


def test_colour_jitter_keeps_gray_gray_and_stays_small():
    gray = torch.full((8, 3, 16, 16), 0.5)
    out = tr._color_jitter(gray, torch.rand(8, 4, generator=_gen()))
    assert (out.max(1).values - out.min(1).values).max() < 1e-5  # saturation/hue leave gray alone
    assert ((out - 0.5).abs() <= 0.5 * tr.STRONG["brightness"] + 1e-5).all()


def test_augment_none_is_identity_and_bad_level_refused():
    x = _batch(2)
    assert tr.augment_batch(x, _gen(), "none") is x
    with pytest.raises(ValueError, match="'heavy'.*none, light, strong"):
        tr.augment_batch(x, _gen(), "heavy")


def test_tta_views_are_the_distinct_dihedral_views():
    x = _batch(2)
    views = tr.tta_views(x)
    assert len(views) == 8 and torch.equal(views[0], x)
    flat = {v.numpy().tobytes() for v in views}
    assert len(flat) == 8
    four = tr.tta_views(x, views=4)
    assert [torch.equal(v, torch.flip(x, dims=(-2,))) for v in four] == [False, False, False, True]
    assert all(any(torch.equal(v, w) for w in views) for v in four)
    with pytest.raises(ValueError):
        tr.tta_views(x, views=5)


def test_pil_pipeline_eval_matches_the_tensor_path():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    pil_path = tr.create_transform(CFG, 24, train=False)(img)
    tensor_path = tr.normalize_batch(tr.pil_to_uint8(img, 24)[None], CFG, channels_last=False)[0]
    torch.testing.assert_close(pil_path, tensor_path, atol=1e-5, rtol=1e-5)


def test_pil_pipeline_train_strong_gives_normalised_square_tensor():
    torch.manual_seed(0)
    out = tr.create_transform(CFG, 24, train=True, augment="strong")(Image.new("RGB", (40, 30), (200, 100, 50)))
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32


def test_white_balance_gains_follow_the_black_body_and_keep_daylight():
    gains = tr._black_body_gains(torch.tensor([4500.0, 6500.0, 10000.0]))
    assert torch.allclose(gains[1], torch.ones(3))
    assert gains[0, 0] > 1.15 and gains[0, 2] < 0.75  # warm light: red up, blue down
    assert gains[2, 0] < 1 and gains[2, 2] > 1
    assert torch.all(gains[:, 1] == 1)


def test_stain_augment_varies_the_red_blue_balance_of_a_grey_picture():
    grey = torch.full((64, 3, 8, 8), 0.5)
    out = tr.augment_batch(grey, torch.Generator().manual_seed(0), "stain")
    red_over_blue = out[:, 0].mean((1, 2)) / out[:, 2].mean((1, 2)).clamp(min=1e-3)
    assert red_over_blue.max() > 1.3 and red_over_blue.min() < 0.85
