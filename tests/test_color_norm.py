"""color_norm.py: the sRGB <-> L*a*b* conversion against reference values, Reinhard transfer
to the reference statistics, and a run that stores its reference and applies it everywhere."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bloodcell_lib.data import color_norm
from bloodcell_lib.data.transforms import normalize_batch
from bloodcell_lib.evaluation.predict import predict_tensors
from bloodcell_lib.modeling.loaded import load_checkpoint
from bloodcell_lib.training import train
from test_train import make_tiny_dataset, tiny_config


def _pixels(*rgb):
    return torch.tensor(rgb, dtype=torch.float32).view(-1, 3, 1, 1)


def test_lab_of_reference_colours():
    lab = color_norm.rgb_to_lab(_pixels([1, 1, 1], [1, 0, 0], [0, 0, 0])).flatten(1)
    assert lab[0].tolist() == pytest.approx([100.0, 0.0, 0.0], abs=0.02)
    assert lab[1].tolist() == pytest.approx([53.24, 80.09, 67.20], abs=0.05)  # sRGB red, D65
    assert lab[2].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-3)


def test_rgb_lab_round_trip():
    rgb = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(color_norm.lab_to_rgb(color_norm.rgb_to_lab(rgb)), rgb, atol=1e-4, rtol=0)


def test_reinhard_reaches_the_reference_and_removes_a_colour_cast():
    g = torch.Generator().manual_seed(1)
    cells = (torch.rand(6, 3, 32, 32, generator=g) * 0.5 + 0.25)
    entry = color_norm.reference((cells * 255).to(torch.uint8))
    assert entry["method"] == "reinhard" and entry["n"] == 6
    out = color_norm.reinhard(cells, entry)
    mean = color_norm.rgb_to_lab(out).flatten(2).mean(2).mean(0)
    assert mean.tolist() == pytest.approx(entry["lab_mean"], abs=0.5)
    bluer = (cells * torch.tensor([0.8, 0.9, 1.1]).view(1, 3, 1, 1)).clamp(0, 1)  # another lab's stain
    before = (bluer - cells).abs().mean()
    after = (color_norm.reinhard(bluer, entry) - out).abs().mean()
    assert after < before / 3


def test_normalize_batch_applies_the_runs_reference():
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    plain = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    entry = color_norm.reference(x)
    assert not torch.allclose(normalize_batch(x, {**plain, "color_norm": entry}, False), normalize_batch(x, plain, False))
    torch.testing.assert_close(normalize_batch(x, {**plain, "color_norm": entry}, False),
                               normalize_batch(x.float() / 255, {**plain, "color_norm": entry}, False))


def test_a_run_stores_its_reference_and_predict_applies_it(tmp_path):
    data = make_tiny_dataset(tmp_path / "data", per_class=8)
    result = train.fit(tiny_config(tmp_path, data, epochs=1, use_cache=False, color_norm="reinhard"), progress=False)
    loaded = load_checkpoint(result.run_dir / "checkpoint_best.pt")
    entry = loaded.data_config["color_norm"]
    assert entry["method"] == "reinhard" and entry["n"] > 0 and len(entry["lab_mean"]) == 3
    images = torch.randint(0, 256, (3, 3, loaded.image_size, loaded.image_size), dtype=torch.uint8)
    with_norm = predict_tensors(loaded, images)
    without = predict_tensors(replace(loaded, data_config={k: v for k, v in loaded.data_config.items()
                                                           if k != "color_norm"}), images)
    assert with_norm.shape == (3, len(loaded.class_names)) and not torch.allclose(torch.from_numpy(with_norm),
                                                                                    torch.from_numpy(without))
