"""Decode and resize every image once, into one uint8 tensor file under ``cache/``.

JPEG decoding and resizing dominate a small model's epoch on CPU, and they give the same
result every epoch, so ``load_or_build_cache`` does them once (on all cores) and stores
``[N, 3, S, S]`` uint8 (``transforms.pil_to_uint8``'s output) aligned with the table's rows.
Augmentation and normalisation then run per batch on tensors (``transforms``).

The cache file's name carries a hash of every (path, size, mtime, box), the image size and
``transforms.PREPROCESS_VERSION``: a changed, added or removed file, another crop or size
gives another file. Old files are never needed again; ``cache/`` can be deleted at any time.
Size: N * 3 * S * S bytes (15,390 PBC images: 0.76 GB at 128 px, 2.3 GB at 224 px).

Every new draw of training pictures (another seed, fold or recipe) is another file, so the
folder would grow without end. After each new file, ``prune_cache`` deletes the least
recently used image files beyond ``BLOODCELL_CACHE_MAX_GB`` (default 10 GB), and says so.
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from bloodcell_lib.data import images
from bloodcell_lib.core import paths
from bloodcell_lib.core.fileio import atomic_torch_save
from bloodcell_lib.data.transforms import PREPROCESS_VERSION, pil_to_uint8

CACHE_FORMAT = "bloodcell-image-cache"
CACHE_LIMIT_VARIABLE = "BLOODCELL_CACHE_MAX_GB"
DEFAULT_CACHE_LIMIT_GB = 10.0

Item = tuple[str, "tuple[float, ...] | None"]  # (path, crop box)


@dataclass
class CachedImages:
    """Decoded images aligned with the table's rows.

    ``failed`` lists (path, reason) for rows whose image could not be loaded; their rows in
    ``images`` are zeros and ``ok`` is False. The caller must drop those rows AND report
    them (file and reason); they are never skipped silently here.
    """

    images: torch.Tensor  # [N, 3, S, S] uint8
    ok: torch.Tensor  # [N] bool
    failed: list[tuple[str, str]]
    file: Path
    from_cache: bool


def _box(value: Any) -> tuple[float, ...] | None:
    # pandas turns a missing box into None or NaN depending on the column's other values.
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return tuple(float(v) for v in value)


def _items(table: Any) -> list[Item]:
    boxes = table["box"] if "box" in table else [None] * len(table)
    return [(str(p), _box(b)) for p, b in zip(table["path"], boxes)]


def _fingerprint(path: str) -> tuple[int, int]:
    try:
        stat = os.stat(path)
    except OSError:
        return (-1, -1)  # decoding will fail and report the file
    return (stat.st_size, stat.st_mtime_ns)


def cache_key(items: Iterable[Item], image_size: int) -> str:
    entries = [[path, *_fingerprint(path), box] for path, box in items]
    blob = json.dumps([CACHE_FORMAT, PREPROCESS_VERSION, image_size, entries])
    return hashlib.sha256(blob.encode()).hexdigest()


def _decode(item: Item, image_size: int) -> tuple[np.ndarray | None, str | None]:
    # numpy, not torch: a tensor sent between processes would travel as one shared-memory
    # file descriptor per image.
    path, box = item
    try:
        return pil_to_uint8(images.load_rgb(path, box), image_size).numpy(), None
    except images.ImageLoadError as err:
        return None, err.reason


def _decode_chunk(chunk: list[Item], image_size: int) -> list[tuple[np.ndarray | None, str | None]]:
    return [_decode(item, image_size) for item in chunk]


def _decode_all(items: list[Item], image_size: int, num_workers: int, progress: bool):
    """Yield (array or None, reason or None) per item, in order."""
    bar = tqdm(total=len(items), desc=f"caching {len(items)} images at {image_size}px",
               disable=not progress, unit="img", ascii=True, file=sys.stdout, mininterval=2.0)
    with bar:
        if num_workers <= 1:
            for item in items:
                yield _decode(item, image_size)
                bar.update()
            return
        # Chunks amortise inter-process overhead; several per worker keep both cores busy to the end.
        size = max(1, min(256, len(items) // (num_workers * 8)))
        chunks = [items[i:i + size] for i in range(0, len(items), size)]
        # fork where the OS has it, as torch's DataLoader does on Linux: workers start at once
        # and scripts need no `if __name__ == "__main__"` guard (which spawn, on macOS and
        # Windows, does need). Workers only decode with PIL; they never touch CUDA.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(min(num_workers, len(chunks)), mp_context=multiprocessing.get_context(method)) as pool:
            for results in pool.map(_decode_chunk, chunks, [image_size] * len(chunks)):
                yield from results
                bar.update(len(results))


def _build(items: list[Item], image_size: int, num_workers: int, progress: bool):
    # Filled in numpy: a per-row torch copy may go through intra-op threads, which costs
    # milliseconds per image on a busy machine.
    data = np.zeros((len(items), 3, image_size, image_size), dtype=np.uint8)
    ok = np.ones(len(items), dtype=bool)
    failed = []
    for row, (array, reason) in enumerate(_decode_all(items, image_size, num_workers, progress)):
        if array is None:
            ok[row] = False
            failed.append((items[row][0], reason))
        else:
            data[row] = array
    return torch.from_numpy(data), torch.from_numpy(ok), failed


def _read(file: Path, key: str, n: int) -> dict | None:
    """The stored cache, or None (with a warning) when the file is unreadable or not ours."""
    try:
        # mmap: the images are paged in from the file as used, not read into memory up front.
        stored = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        if stored.get("format") == CACHE_FORMAT and stored.get("key") == key and len(stored["images"]) == n:
            return stored
        reason = "it belongs to other inputs"
    except Exception as err:  # a truncated or foreign file: rebuilding is always correct
        reason = f"{type(err).__name__}: {err}"
    warnings.warn(f"image cache {file} is unusable ({reason}); rebuilding it", stacklevel=3)
    return None


def cache_limit_bytes() -> int:
    """The image cache's size limit: ``$BLOODCELL_CACHE_MAX_GB`` gigabytes, default 10."""
    text = os.environ.get(CACHE_LIMIT_VARIABLE, "").strip()
    try:
        gigabytes = float(text) if text else DEFAULT_CACHE_LIMIT_GB
    except ValueError:
        gigabytes = math.nan
    if not gigabytes >= 0:  # also refuses NaN
        raise ValueError(f"{CACHE_LIMIT_VARIABLE}={text!r} is not a size in gigabytes (e.g. 10 or 2.5)")
    return int(gigabytes * 1e9)


def prune_cache(cache_dir: str | os.PathLike, keep: Path, limit_bytes: int) -> list[Path]:
    """Delete the least recently used image cache files in ``cache_dir`` (never ``keep``)
    until the rest, ``keep`` included, fit in ``limit_bytes``. Returns the deleted files.

    "Used" is the file's mtime, which ``load_or_build_cache`` renews on every load. A process
    still reading a deleted file keeps its data (POSIX unlinks only the name); one about to
    open it finds it missing and rebuilds it.
    """
    entries = []
    for file in Path(cache_dir).glob("images_*px_*.pt"):
        try:
            stat = file.stat()
        except OSError:  # deleted meanwhile by another process
            continue
        if file != keep:
            entries.append((stat.st_mtime_ns, stat.st_size, file))
    total = keep.stat().st_size if keep.is_file() else 0
    removed = []
    for _, size, file in sorted(entries, reverse=True):  # newest first
        total += size
        if total > limit_bytes:
            file.unlink(missing_ok=True)
            removed.append(file)
    return removed


def _report_pruned(removed: list[Path], cache_dir: Path, limit_bytes: int) -> None:
    if removed:
        print(f"image cache: deleted {len(removed)} least recently used file(s) from {cache_dir} to keep it "
              f"under {limit_bytes / 1e9:g} GB (${CACHE_LIMIT_VARIABLE}): {', '.join(f.name for f in removed)}",
              flush=True)


def load_or_build_cache(table: Any, image_size: int, *, cache_dir: str | os.PathLike | None = None,
                        num_workers: int = 2, progress: bool = True) -> CachedImages:
    """Images of ``table`` (columns ``path`` and optional ``box``) at ``image_size``, decoded
    once and then loaded from ``cache_dir`` (default ``paths.cache_dir()``).

    ``num_workers`` processes decode (0 or 1: in this process). Rows that fail to load are
    listed in ``failed``; see CachedImages. A new file may delete old ones: see prune_cache.
    """
    limit_bytes = cache_limit_bytes()  # a bad setting fails before minutes of decoding
    items = _items(table)
    key = cache_key(items, image_size)
    folder = Path(cache_dir or paths.cache_dir())
    file = folder / f"images_{image_size}px_{len(items)}_{key[:20]}.pt"
    stored = _read(file, key, len(items)) if file.is_file() else None
    from_cache = stored is not None
    if from_cache:
        try:
            os.utime(file)  # marks it used, for prune_cache
        except OSError:  # a read-only cache is still a good cache
            pass
    else:
        data, ok, failed = _build(items, image_size, num_workers, progress)
        stored = {"format": CACHE_FORMAT, "key": key, "image_size": image_size,
                  "paths": [path for path, _ in items], "images": data, "ok": ok, "failed": failed}
        atomic_torch_save(stored, file)
        _report_pruned(prune_cache(folder, file, limit_bytes), folder, limit_bytes)
    return CachedImages(images=stored["images"], ok=stored["ok"], failed=[tuple(f) for f in stored["failed"]],
                        file=file, from_cache=from_cache)


class TensorImageDataset(Dataset):
    """(uint8 image [3, S, S], int label) pairs from a cached tensor, optionally a subset of rows."""

    def __init__(self, images: torch.Tensor, labels: Iterable[int], indices: Iterable[int] | None = None):
        self.images = images
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        if len(self.labels) != len(images):
            raise ValueError(f"{len(self.labels)} labels for {len(images)} images")
        self.indices = torch.arange(len(images)) if indices is None else torch.as_tensor(list(indices), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = int(self.indices[i])
        return self.images[row], int(self.labels[row])
