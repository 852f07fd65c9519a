"""core.provenance: run_info.json names the environment lock a run was installed from."""
from __future__ import annotations

import hashlib
import re
import tomllib

from bloodcell_lib.core import provenance
from bloodcell_lib.core.paths import PROJECT_ROOT


def _pins() -> dict[str, str]:
    lines = provenance.LOCK_FILE.read_text().splitlines()
    return dict(line.lower().split("==", 1) for line in lines if line and not line.startswith("#"))


def test_lock_pins_every_dependency_and_torch_from_disk():
    pins = _pins()
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    names = {re.split(r"[=<>!~\[ ]", dep, maxsplit=1)[0].lower().replace("_", "-") for dep in wanted}
    assert names - set(pins) == set()


def test_run_info_records_the_lock_sha256(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "git_commit", lambda *a, **k: None)  # no git subprocess
    assert provenance.environment_lock() == {
        "path": "requirements.lock", "sha256": hashlib.sha256(provenance.LOCK_FILE.read_bytes()).hexdigest()}
    assert provenance.environment_lock(tmp_path / "none.lock")["sha256"] is None
    info = provenance.collect({"seed": 0}, seed=0)
    assert info["environment_lock"]["sha256"] == provenance.environment_lock()["sha256"]
