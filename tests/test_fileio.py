"""Atomic writes leave either the old file or the new one, never a partial file."""
from __future__ import annotations

import json

import pytest
import torch

from bloodcell_lib.core import fileio


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "sub" / "out.json"
    fileio.atomic_write_json(target, {"a": 1})
    fileio.atomic_write_json(target, {"a": 2, "b": [1, 2]})
    assert json.loads(target.read_text()) == {"a": 2, "b": [1, 2]}
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]  # no temporary left behind


def test_failed_write_keeps_old_content_and_no_temp(tmp_path):
    target = tmp_path / "model.pt"
    fileio.atomic_torch_save({"w": torch.ones(2)}, target)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom mid-write")

    with pytest.raises(RuntimeError, match="boom"):
        fileio.atomic_torch_save({"w": torch.zeros(2), "bad": Unpicklable()}, target)
    assert torch.equal(torch.load(target)["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_sha256_file_matches_hashlib(tmp_path):
    import hashlib

    data = b"x" * 3_000_001
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert fileio.sha256_file(path, chunk_size=4096) == hashlib.sha256(data).hexdigest()


def test_written_files_get_umask_permissions(tmp_path):
    import os

    target = fileio.atomic_write_text(tmp_path / "history.csv", "a,b\n")
    assert target.stat().st_mode & 0o777 == 0o666 & ~fileio._UMASK
    assert os.access(target, os.R_OK)


def test_atomic_link_shares_bytes_until_the_source_is_replaced(tmp_path, monkeypatch):
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    fileio.atomic_write_bytes(best, b"old best")
    fileio.atomic_write_bytes(last, b"epoch 1")
    fileio.atomic_link(last, best)
    assert best.read_bytes() == b"epoch 1" and best.stat().st_ino == last.stat().st_ino
    fileio.atomic_write_bytes(last, b"epoch 2")  # replaced by rename: best keeps epoch 1
    assert (best.read_bytes(), last.read_bytes()) == (b"epoch 1", b"epoch 2")
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []

    def no_links(*args):
        raise OSError("hard links not supported")

    monkeypatch.setattr(fileio.os, "link", no_links)
    fileio.atomic_link(last, best)  # falls back to a copy
    assert best.read_bytes() == b"epoch 2" and best.stat().st_ino != last.stat().st_ino


def test_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path):
    import errno

    target = tmp_path / "last.pt"
    fileio.atomic_write_bytes(target, b"old")
    with pytest.raises(fileio.DiskFullError, match=f"could not write {target}: its file system is full"):
        with fileio.atomic_open(target) as handle:
            handle.write(b"new, partly")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("free_mib, full", [(1, True), (10_000, False)])
def test_torch_short_writes_are_blamed_on_space_only_when_space_is_short(tmp_path, monkeypatch, free_mib, full):
    # torch.save reports a full disk as a short write, not as ENOSPC.
    import shutil
    from types import SimpleNamespace

    monkeypatch.setattr(shutil, "disk_usage", lambda folder: SimpleNamespace(free=free_mib << 20))
    monkeypatch.setattr(torch, "save", lambda obj, handle: (_ for _ in ()).throw(
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3964864 vs 3964760")))
    with pytest.raises(fileio.DiskFullError if full else RuntimeError) as raised:
        fileio.atomic_torch_save({"w": torch.ones(2)}, tmp_path / "best.pt")
    assert isinstance(raised.value, fileio.DiskFullError) == full
    assert list(tmp_path.iterdir()) == []
