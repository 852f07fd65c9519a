"""copies: augmented copies of one original grouped by colour, whatever their file names."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bloodcell_lib.data.copies import colour_signature, copy_groups


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("BLOODCELL_CACHE", str(tmp_path / "cache"))


def smear(seed: int) -> Image.Image:
    """A stand-in original: blobs of a few colours of its own on a light background."""
    rng = np.random.default_rng(seed)
    pixels = np.full((120, 160, 3), 230, dtype=np.uint8)
    palette = rng.integers(40, 220, size=(4, 3))
    for colour in palette:
        y, x = rng.integers(10, 100), rng.integers(10, 140)
        pixels[y:y + 25, x:x + 25] = colour
    return Image.fromarray(pixels)


def augmented(original: Image.Image, k: int) -> Image.Image:
    """What the generator did: rotate with black corners, flip, shift."""
    copy = original.rotate(37 * k, fillcolor=(0, 0, 0))
    copy = copy.transpose(Image.FLIP_LEFT_RIGHT) if k % 2 else copy
    return copy.transform(copy.size, Image.AFFINE, (1, 0, 3 * k, 0, 1, -2 * k), fillcolor=(0, 0, 0))


def test_copies_of_one_original_share_a_group_whatever_their_names(tmp_path: Path):
    paths, truth = [], []
    for original in range(3):
        for k in range(5):
            # Names cycle 0..2 regardless of the original, as dataset2's do.
            path = tmp_path / f"_{(original + k) % 3}_{original}{k}.png"
            augmented(smear(original), k).save(path)
            paths.append(path)
            truth.append(original)
    groups = copy_groups(paths, n_originals=3)
    pairs = {(t, g) for t, g in zip(truth, groups)}
    assert len(pairs) == 3 and len({g for _, g in pairs}) == 3


def test_unreadable_files_get_no_group(tmp_path: Path):
    good = [tmp_path / f"{i}.png" for i in range(3)]
    for i, path in enumerate(good):
        smear(i).save(path)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    groups = copy_groups([*good, bad, tmp_path / "missing.png"], n_originals=2)
    assert groups[3] is None and groups[4] is None and colour_signature(bad) is None
    assert all(g in (0, 1) for g in groups[:3])


def test_one_picture_per_original_is_its_own_group(tmp_path: Path):
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for i, path in enumerate(paths):
        smear(0).save(path)
    assert copy_groups(paths, n_originals=3) == [0, 1, 2]


def test_black_fill_does_not_count(tmp_path: Path):
    original = smear(4)
    rotated = original.rotate(45, fillcolor=(0, 0, 0))
    assert np.abs(colour_signature_of(original, tmp_path / "a.png") - colour_signature_of(rotated, tmp_path / "b.png")).max() < 0.1


def colour_signature_of(image: Image.Image, path: Path) -> np.ndarray:
    image.save(path)
    return colour_signature(path)

