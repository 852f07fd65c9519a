"""One shared ``./run_all.sh --profile smoke`` build for test_run_all.py and test_reporting.py.

Each test module wraps ``smoke_build(tmp_path_factory)`` in a session-scoped fixture; the
build itself runs once per pytest process (cached here), into a temporary folder, with
reports, runs and cache all redirected there so the user's reports/ and runs/ are untouched.
"""
from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN_ALL = ROOT / "run_all.sh"
SMOKE_TIMEOUT = int(os.environ.get("BLOODCELL_SMOKE_TIMEOUT", "1200"))


@dataclass
class SmokeBuild:
    base: Path
    reports: Path
    runs: Path
    cache: Path
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def env(self, **extra: str) -> dict[str, str]:
        return build_env(self.reports, self.runs, self.cache, **extra)


_BUILD: SmokeBuild | None = None


def build_env(reports: Path, runs: Path, cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"BLOODCELL_REPORTS": str(reports), "BLOODCELL_RUNS": str(runs), "BLOODCELL_CACHE": str(cache)})
    env.pop("BLOODCELL_EXPERIMENTS", None)
    env.update(extra)
    return env


def tiny_experiment_env(tmp_path: Path, name: str, *, epochs: int, settings: str = "", **data) -> dict[str, str]:
    """An experiments folder holding one tiny experiment ``name`` (folder-per-class pictures made
    by test_train.make_tiny_dataset(**data), resnet18 from random weights at 32 px), and the
    build environment for it: reports, runs and cache under ``tmp_path``."""
    from test_train import make_tiny_dataset

    folder = make_tiny_dataset(tmp_path / "data", **data)
    experiments = tmp_path / f"{name}_experiments"
    experiments.mkdir()
    (experiments / f"{name}.yaml").write_text(
        f"dataset: folder\ndata_dir: {folder}\nmodel: resnet18\npretrained: false\nimage_size: 32\n"
        f"epochs: {epochs}\nbatch_size: 8\nthreads: 1\n{settings}")
    return build_env(tmp_path / "reports", tmp_path / "runs", tmp_path / "cache", BLOODCELL_EXPERIMENTS=str(experiments))


def run_all(*args: str, env: dict[str, str], timeout: int = SMOKE_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([str(RUN_ALL), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def smoke_build(tmp_path_factory) -> SmokeBuild:
    global _BUILD
    if _BUILD is None:
        base = tmp_path_factory.mktemp("smoke")
        reports, runs, cache = base / "reports", base / "runs", base / "cache"
        started = time.time()
        proc = run_all("--profile", "smoke", env=build_env(reports, runs, cache))
        _BUILD = SmokeBuild(base, reports, runs, cache, proc.returncode, proc.stdout, proc.stderr,
                            time.time() - started)
        print(f"\n[smoke build] exit {proc.returncode} in {_BUILD.seconds:.1f} s -> {reports}")
    return _BUILD


def experiment_names() -> list[str]:
    folder = ROOT / "experiments"
    return sorted(p.stem for p in [*folder.glob("*.yaml"), *folder.glob("*.yml")])
