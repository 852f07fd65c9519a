"""Data-root resolution (explicit, then $BLOODCELL_DATA, then data/raw, then ../shared/data) and the
output folders ($BLOODCELL_REPORTS, $BLOODCELL_RUNS, $BLOODCELL_CACHE, read at call time)."""
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


@pytest.mark.parametrize("variable, folder, default", [("BLOODCELL_REPORTS", paths.reports_dir, "reports"),
                                                       ("BLOODCELL_RUNS", paths.runs_dir, "runs"),
                                                       ("BLOODCELL_CACHE", paths.cache_dir, "cache")])
def test_output_folders_follow_their_variable_at_call_time(monkeypatch, tmp_path, variable, folder, default):
    monkeypatch.delenv(variable, raising=False)
    assert folder() == paths.PROJECT_ROOT / default
    monkeypatch.setenv(variable, str(tmp_path / "elsewhere"))  # set after import: still followed
    assert folder() == tmp_path / "elsewhere"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(variable, "relative")
    assert folder() == tmp_path / "relative"  # made absolute where it is read
