"""Where a run came from: config, seed, split hash, package versions, machine, git commit.

Written next to every run as ``run_info.json`` so a result can be traced and repeated
without the person who made it. The machine description leaves out the host name on
purpose: reports are shared.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from bloodcell_lib.core.fileio import atomic_write_json, sha256_file
from bloodcell_lib.core.paths import PROJECT_ROOT

# import name -> distribution name (for the version lookup when the import is not loaded)
PACKAGES = {
    "torch": "torch",
    "torchvision": "torchvision",
    "timm": "timm",
    "numpy": "numpy",
    "sklearn": "scikit-learn",
    "PIL": "pillow",
    "pandas": "pandas",
}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for module, dist_name in PACKAGES.items():
        try:
            versions[module] = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            versions[module] = None
    try:
        from bloodcell_lib import __version__

        versions["bloodcell"] = __version__
    except ImportError:  # pragma: no cover
        pass
    return versions


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python_implementation": platform.python_implementation(),
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["cuda_version"] = torch.version.cuda
    except ImportError:  # pragma: no cover
        pass
    return info


def _cpu_model() -> str:
    """platform.processor() is empty on many Linux systems; /proc/cpuinfo names the CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def git_commit(root: str | os.PathLike = PROJECT_ROOT) -> dict[str, Any] | None:
    """HEAD commit and whether the tree has uncommitted changes; None outside git or before
    the first commit."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return None
    try:
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        dirty = None
    return {"commit": commit, "dirty": dirty}


LOCK_FILE = PROJECT_ROOT / "requirements.lock"


def environment_lock(path: Path = LOCK_FILE) -> dict[str, Any]:
    """The lock file every dependency was installed from (scripts/ensure_env.sh) and its
    sha256: with it a run's environment can be rebuilt exactly."""
    return {"path": path.name, "sha256": sha256_file(path) if path.is_file() else None}


def _records(frame_or_list) -> list[dict[str, Any]]:
    if frame_or_list is None:
        return []
    if hasattr(frame_or_list, "to_dict"):
        return [{k: str(v) for k, v in row.items()} for row in frame_or_list.to_dict("records")]
    out = []
    for item in frame_or_list:
        if isinstance(item, dict):
            out.append({k: str(v) for k, v in item.items()})
        else:
            path, reason = item
            out.append({"item": str(path), "reason": str(reason)})
    return out


def collect(config: dict[str, Any], *, seed: int, split_file: str | os.PathLike | None = None,
            pretrained_requested: bool | None = None, pretrained_used: bool | None = None,
            init_checkpoint: dict[str, Any] | None = None, weights: Any = None,
            timings: dict[str, Any] | None = None, dropped=None, failed=None,
            distributed: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run_info.json record. ``dropped`` is the manifest's dropped table (item, reason);
    ``failed`` the images the cache could not decode, as (path, reason) pairs."""
    split_sha = sha256_file(split_file) if split_file and Path(split_file).is_file() else None
    info: dict[str, Any] = {
        "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "seed": seed,
        "deterministic": bool(config.get("deterministic")),
        "split_file": str(split_file) if split_file else None,
        "split_sha256": split_sha,
        "pretrained": {
            "requested": pretrained_requested,
            "used": pretrained_used,
            "init": "checkpoint" if init_checkpoint else "pretrained" if pretrained_used else "random",
            "init_checkpoint": init_checkpoint,
            "weights": weights,
        },
        "packages": package_versions(),
        "environment_lock": environment_lock(),
        "machine": machine_info(),
        "git": git_commit(),
        "command": [os.path.basename(sys.argv[0]), *sys.argv[1:]] if sys.argv else [],
        "distributed": distributed or {"world_size": 1},
        "timings": timings or {},
        "dropped_images": _records(dropped),
        "failed_images": _records(failed),
    }
    if extra:
        info.update(extra)
    return info


def write_run_info(path: str | os.PathLike, info: dict[str, Any]) -> Path:
    """``path``: the run's run_info.json (``RunDir.run_info``)."""
    return atomic_write_json(path, info)
