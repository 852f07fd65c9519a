"""cache: decode once, reload without decoding, invalidate on change, report failures."""
from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from bloodcell_lib.data import cache, images

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 250, 0)]


@pytest.fixture
def data(tmp_path):
    """A read-only-by-convention data folder of tiny images plus one non-image."""
    folder = tmp_path / "data"
    folder.mkdir()
    rows = []
    for i, colour in enumerate(COLOURS):
        path = folder / f"cell{i}.png"
        Image.new("RGB", (24, 20), colour).save(path)
        rows.append({"path": str(path), "box": None})
    split = np.zeros((20, 40, 3), dtype=np.uint8)
    split[:, 20:, 2] = 255  # right half blue
    Image.fromarray(split).save(folder / "split.png")
    rows.append({"path": str(folder / "split.png"), "box": (20, 0, 40, 20)})
    (folder / "fake.jpg").write_bytes(b"\x00\x00\x00\x01Bud1" + b"\x00" * 64)
    rows.append({"path": str(folder / "fake.jpg"), "box": None})
    return folder, pd.DataFrame(rows)


def _build(table, cache_dir, size=8, **kwargs):
    return cache.load_or_build_cache(table, size, cache_dir=cache_dir, num_workers=0, progress=False, **kwargs)


def test_build_aligns_rows_crops_boxes_and_reports_failures(data, tmp_path):
    folder, table = data
    before = sorted(os.listdir(folder))
    result = _build(table, tmp_path / "cache")
    assert result.images.shape == (6, 3, 8, 8) and result.images.dtype == torch.uint8
    for row, colour in enumerate(COLOURS):
        assert result.images[row, :, 0, 0].tolist() == list(colour)
    assert (result.images[4, 2] == 255).all() and (result.images[4, :2] == 0).all()  # only the box
    assert result.ok.tolist() == [True] * 5 + [False]
    assert result.failed == [(str(folder / "fake.jpg"), "not an image: a macOS .DS_Store file")]
    assert not result.from_cache and result.file.parent == tmp_path / "cache"
    assert sorted(os.listdir(folder)) == before  # nothing written beside the data


def test_second_call_loads_without_decoding(data, tmp_path, monkeypatch):
    _, table = data
    first = _build(table, tmp_path)
    monkeypatch.setattr(images, "load_rgb", lambda *a, **k: pytest.fail("decoded again"))
    second = _build(table, tmp_path)
    assert second.from_cache and second.file == first.file
    assert torch.equal(second.images, first.images) and torch.equal(second.ok, first.ok)
    assert second.failed == first.failed


def test_changed_file_or_size_invalidates(data, tmp_path):
    folder, table = data
    first = _build(table, tmp_path)
    path = folder / "cell0.png"
    stat = path.stat()
    Image.new("RGB", (24, 20), (9, 9, 9)).save(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a newer mtime even on coarse clocks
    changed = _build(table, tmp_path)
    assert not changed.from_cache and changed.file != first.file
    assert changed.images[0, :, 0, 0].tolist() == [9, 9, 9]
    resized = _build(table, tmp_path, size=12)
    assert not resized.from_cache and resized.images.shape[-1] == 12
    assert _build(table, tmp_path, size=12).from_cache


def test_process_pool_gives_the_same_tensor(data, tmp_path):
    _, table = data
    serial = _build(table, tmp_path / "a")
    pooled = cache.load_or_build_cache(table, 8, cache_dir=tmp_path / "b", num_workers=2, progress=False)
    assert torch.equal(serial.images, pooled.images) and pooled.failed == serial.failed


def test_unreadable_cache_file_is_rebuilt(data, tmp_path):
    _, table = data
    first = _build(table, tmp_path)
    first.file.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unusable"):
        again = _build(table, tmp_path)
    assert not again.from_cache and torch.equal(again.images, first.images)


def test_tensor_dataset_indexes_a_subset(data, tmp_path):
    _, table = data
    result = _build(table, tmp_path)
    dataset = cache.TensorImageDataset(result.images, [0, 1, 2, 3, 1, 0], indices=[3, 1])
    assert len(dataset) == 2
    image, label = dataset[0]
    assert torch.equal(image, result.images[3]) and label == 3
    with pytest.raises(ValueError, match="2 labels for 6 images"):
        cache.TensorImageDataset(result.images, [0, 1])


def _with_box(table, box):
    """The same pictures with another crop of the last good row: another cache file of the same size."""
    table = table.copy()
    table.at[4, "box"] = box
    return table


def test_new_files_delete_the_least_recently_used_beyond_the_limit(data, tmp_path, monkeypatch, capsys):
    _, table = data
    folder = tmp_path / "cache"
    (folder / "copy-groups").mkdir(parents=True)  # other caches share the folder
    (folder / "notes.txt").write_text("not an image cache")
    a = _build(table, folder).file
    b = _build(_with_box(table, (0, 0, 20, 20)), folder).file
    monkeypatch.setenv(cache.CACHE_LIMIT_VARIABLE, str(2.5 * a.stat().st_size / 1e9))
    os.utime(a, ns=(10**9, 10**9))  # a older than b ...
    os.utime(b, ns=(2 * 10**9, 2 * 10**9))
    assert _build(table, folder).from_cache  # ... until a is used again
    capsys.readouterr()

    c = _build(_with_box(table, (10, 0, 30, 20)), folder).file
    assert a.is_file() and c.is_file() and not b.exists()
    assert (folder / "copy-groups").is_dir() and (folder / "notes.txt").is_file()
    out = capsys.readouterr().out
    assert "deleted 1 least recently used file(s)" in out and b.name in out and cache.CACHE_LIMIT_VARIABLE in out


def test_the_file_just_built_stays_even_above_the_limit(data, tmp_path, monkeypatch):
    _, table = data
    old = _build(table, tmp_path).file
    monkeypatch.setenv(cache.CACHE_LIMIT_VARIABLE, "0")
    new = _build(_with_box(table, (0, 0, 20, 20)), tmp_path)
    assert new.file.is_file() and not old.exists()
    assert new.images.shape == (6, 3, 8, 8)


@pytest.mark.parametrize("value", ["ten", "-1", "nan"])
def test_a_bad_limit_is_refused_before_decoding(data, tmp_path, monkeypatch, value):
    _, table = data
    monkeypatch.setenv(cache.CACHE_LIMIT_VARIABLE, value)
    monkeypatch.setattr(images, "load_rgb", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(ValueError, match=f"{cache.CACHE_LIMIT_VARIABLE}='{value}' is not a size in gigabytes"):
        _build(table, tmp_path)
