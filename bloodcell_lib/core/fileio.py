"""Atomic file writes: a kill at any moment leaves either the old file or the new one.

Each writer writes a temporary file in the target's folder, flushes it to disk, then
renames it over the target (``os.replace`` is atomic on POSIX within one file system).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()

# A write that fails with less than this free is taken to have failed for want of space:
# torch.save reports a full disk only as "unexpected pos", not as ENOSPC.
FULL_DISK_BYTES = 64 * 2**20


class DiskFullError(OSError):
    """A write failed because its file system is full; the target was left as it was."""


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return -1  # unknown: never blamed on space


def _disk_full_error(path: Path, err: BaseException, free: int) -> DiskFullError | None:
    if not isinstance(err, Exception):
        return None  # KeyboardInterrupt, SystemExit: not a write failure
    if getattr(err, "errno", None) != errno.ENOSPC and not 0 <= free < FULL_DISK_BYTES:
        return None
    return DiskFullError(errno.ENOSPC, f"could not write {path}: its file system is full ({max(free, 0) / 2**20:.0f} MiB "
                         f"free). The previous {path.name}, if any, is unchanged. Free some space (cache/ can be "
                         f"deleted at any time) and run again")


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``.
    A failure on a full file system raises DiskFullError, naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
            # mkstemp creates 0600; give the file the permissions a plain open() would.
            os.fchmod(handle.fileno(), 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException as err:
        free = _free_bytes(path.parent)  # measured before the partial file gives its space back
        Path(tmp).unlink(missing_ok=True)
        full = _disk_full_error(path, err, free)
        if full is not None:
            raise full from err
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def atomic_link(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Make ``path`` hold ``source``'s bytes, atomically: a hard link renamed over ``path``,
    so the bytes are not written a second time. That is safe because every writer here
    replaces a file by rename and never rewrites one in place: replacing ``source`` later
    leaves ``path`` as it was. Where the file system has no hard links, a copy."""
    source, path = Path(source), Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    try:
        os.link(source, tmp)
    except OSError:
        with open(source, "rb") as src, atomic_open(path, "wb") as handle:
            shutil.copyfileobj(src, handle)  # streamed: a checkpoint never sits in memory whole
        return path
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    import torch

    # Streamed into the temporary file: a multi-GB image cache never sits twice in memory.
    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)
    return Path(path)


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()
