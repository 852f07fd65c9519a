"""The study's data (study.yaml beside this file): the published reference numbers and the
targets this project must reach. Data, not code: change a number in study.yaml."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

STUDY_FILE = Path(__file__).with_name("study.yaml")


@functools.lru_cache(maxsize=None)
def load_study(path: Path = STUDY_FILE) -> dict[str, Any]:
    """study.yaml as a dict; the whole-build target's threshold is the build time limit in
    seconds (kept once, as minutes, in the file)."""
    try:
        study = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise RuntimeError(f"{path}: cannot read the study data ({err}); it ships with bloodcell_lib") from err
    study["build_time_limit_seconds"] = study["build_time_limit_minutes"] * 60
    for target in study["targets"]:
        if target["experiment"] is None:
            target["threshold"] = study["build_time_limit_seconds"]
    return study


REFERENCES: list[dict[str, Any]] = load_study()["references"]
TARGETS: list[dict[str, Any]] = load_study()["targets"]
BUILD_TIME_LIMIT_SECONDS: int = load_study()["build_time_limit_seconds"]
