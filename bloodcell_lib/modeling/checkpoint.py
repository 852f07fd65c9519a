"""The checkpoint file: one format for what training writes, resumes and transfers from,
and what prediction and evaluation read.

A checkpoint is a dict of tensors and plain Python values (``torch.load(weights_only=True)``
reads it without running code from the file): ``format`` = FORMAT, ``format_version`` =
VERSION, and at least REQUIRED_KEYS; training adds optimizer, scheduler, epoch, config,
history, best_metric, ... (DEVELOPERS.md, checkpoint dict).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch

from bloodcell_lib.core.fileio import atomic_torch_save

FORMAT = "bloodcell-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("model", "class_names", "model_name", "data_config")


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message names the file and why."""


def save_checkpoint(content: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``content`` plus format and version atomically (a kill leaves the old file)."""
    return atomic_torch_save({"format": FORMAT, "format_version": VERSION, **content}, path)


def _load_failure(path: Path, err: Exception) -> str:
    """A one-line reason for a failed torch.load (its own messages run to many lines)."""
    if isinstance(err, pickle.UnpicklingError) and "weights_only" in str(err).lower():
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - only used to word the message
            names = []
        return ("it holds Python objects that are not loaded from untrusted files"
                + (f": {', '.join(names[:5])}" if names else "")
                + "; bloodcell checkpoints hold tensors and plain values only")
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def _load_file(path: Path, device: str) -> Any:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    with open(path, "rb") as handle:
        head = handle.read(8)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save zip / legacy pickle
        raise CheckpointError(f"{path} is not a bloodcell checkpoint: not a PyTorch file at all "
                              f"(it starts with {head!r})")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # pickle/zip/torch errors: the cause is chained, not the message
        raise CheckpointError(f"{path} is not a readable bloodcell checkpoint ({_load_failure(path, err)})") from err


def read_checkpoint(path: str | os.PathLike, device: str = "cpu") -> dict[str, Any]:
    """The validated checkpoint dict; CheckpointError naming the file for anything unusable."""
    path = Path(path)
    ckpt = _load_file(path, device)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        what = type(ckpt).__name__ if not isinstance(ckpt, dict) else f"dict without format={FORMAT!r}"
        raise CheckpointError(f"{path} is not a bloodcell checkpoint (found a {what}); "
                              "use checkpoint_best.pt or checkpoint_last.pt from a run directory")
    version = ckpt.get("format_version")
    if version != VERSION:
        raise CheckpointError(f"{path} has checkpoint format_version {version!r}; this version of bloodcell "
                              f"reads format_version {VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks checkpoint key(s) {', '.join(missing)}")
    names = ckpt["class_names"]
    if not isinstance(names, (list, tuple)) or len(names) < 2 or not all(isinstance(c, str) for c in names):
        raise CheckpointError(f"{path}: class_names must be a list of at least 2 strings, got {names!r}")
    return ckpt
