"""Data-root resolution: explicit, then $BLOODCELL_DATA, then data/raw, then ../shared/data."""
from __future__ import annotations

import pytest

from bloodcell_lib.core import paths


def test_candidates_order(monkeypatch, tmp_path):
    monkeypatch.setenv("BLOODCELL_DATA", str(tmp_path / "env"))
    names = [why for why, _ in paths.data_root_candidates(tmp_path / "given")]
    assert names == ["explicit argument", "$BLOODCELL_DATA", "project data/raw", "../shared/data beside the checkout"]


def test_find_data_dir_prefers_env_layout(monkeypatch, tmp_path):
    (tmp_path / "env" / "pbc" / "PBC_dataset_normal_DIB").mkdir(parents=True)
    monkeypatch.setenv("BLOODCELL_DATA", str(tmp_path / "env"))
    found = paths.find_data_dir(["pbc/PBC_dataset_normal_DIB"], "pbc")
    assert found == (tmp_path / "env" / "pbc" / "PBC_dataset_normal_DIB").resolve()


def test_missing_data_names_every_place_looked(monkeypatch, tmp_path):
    monkeypatch.setenv("BLOODCELL_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setattr(paths, "RAW_DATA_DIR", tmp_path / "raw")
    monkeypatch.setattr(paths, "SHARED_DATA_DIR", tmp_path / "shared")
    with pytest.raises(paths.DataNotFoundError) as err:
        paths.find_data_dir(["some-set"], "some-set", tmp_path / "given")
    message = str(err.value)
    for place in ("given", "nowhere", "raw", "shared"):
        assert str(tmp_path / place / "some-set") in message
