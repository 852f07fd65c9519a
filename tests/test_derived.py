"""derived: per-file answers stored under cache/ and computed again when a file changes."""
from __future__ import annotations

import os
from pathlib import Path

from bloodcell_lib.core import derived


def counting(calls: list):
    def compute(files):
        calls.append(list(files))
        return [Path(path).read_text() for path in files]
    return compute


def test_answers_are_kept_until_a_file_changes(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("BLOODCELL_CACHE", str(tmp_path / "cache"))
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for path in files:
        path.write_text(path.stem)
    calls: list = []
    assert derived.cached_per_file("kind", "m1", files, counting(calls)) == ["a", "b"]
    assert derived.cached_per_file("kind", "m1", files, counting(calls)) == ["a", "b"] and len(calls) == 1
    files[0].write_text("edited")
    os.utime(files[0], ns=(1, 1))  # another modification time, as an edit gives
    assert derived.cached_per_file("kind", "m1", files, counting(calls)) == ["edited", "b"] and len(calls) == 2
    # Another method or another list of files is another answer.
    derived.cached_per_file("kind", "m2", files, counting(calls))
    derived.cached_per_file("kind", "m2", files[:1], counting(calls))
    assert len(calls) == 4


def test_a_damaged_store_is_computed_again(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("BLOODCELL_CACHE", str(tmp_path / "cache"))
    files = [tmp_path / "a.txt"]
    files[0].write_text("a")
    calls: list = []
    derived.cached_per_file("kind", "m", files, counting(calls))
    for stored in (tmp_path / "cache" / "kind").iterdir():
        stored.write_text("{not json")
    assert derived.cached_per_file("kind", "m", files, counting(calls)) == ["a"] and len(calls) == 2
