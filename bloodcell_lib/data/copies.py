"""Augmented copies of one original picture, found by their colours.

Kaggle's dataset2 was made by running each class's originals through an augmenting
generator many times; a copy is the original rotated, shifted, zoomed or flipped, with black
fill at the corners. Its file names ``_<k>_<n>.jpeg`` do not name the original: ``k`` is the
copy's position in a shuffled batch, so it takes as many values as there are originals, but
one original's copies are spread over all of them (on the official TEST folder, each ``k``
holds copies of several cells). Splitting on ``k`` puts copies of one cell on both sides.

What a copy keeps is its colours: the same stained cell and red cells, only moved. So each
picture is described by its colour histogram (black fill left out) and the pictures of one
folder are clustered (Ward linkage) into as many groups as the folder has originals.
On the real set the groups come out as cells: on TEST/MONOCYTE the four groups hold
154-156 copies each, and a model gets each group entirely right or entirely wrong.
The grouping is not perfect on the larger folders (copies zoomed far in can land in the
group of a similar cell), so it narrows leakage rather than ruling it out; see DEVELOPERS.md.
Clustering a folder costs a few seconds, so each folder's answer is kept (``derived``).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from sklearn.cluster import AgglomerativeClustering

from bloodcell_lib.core.derived import cached_per_file
from bloodcell_lib.data.images import ImageLoadError, load_rgb

BINS = 16  # per RGB channel: 4,096 colours, fine enough to tell smears apart
FILL_LEVEL = 60  # R+G+B at or below this is the generator's black fill, not the smear
METHOD = f"colour-histogram-ward/bins={BINS}/fill={FILL_LEVEL}"


def colour_signature(path: str | os.PathLike) -> np.ndarray | None:
    """Square root of the colour histogram (so the distance is Hellinger's); None when the
    file cannot be read (the loader's own check reports it) or is all black fill."""
    try:
        pixels = np.asarray(load_rgb(path), dtype=np.int32)
    except ImageLoadError:
        return None
    kept = pixels[pixels.sum(axis=-1) > FILL_LEVEL] * BINS // 256
    if len(kept) == 0:
        return None
    counts = np.bincount((kept[:, 0] * BINS + kept[:, 1]) * BINS + kept[:, 2], minlength=BINS ** 3)
    return np.sqrt(counts / counts.sum()).astype(np.float32)


def copy_groups(files: Sequence[str | os.PathLike], n_originals: int) -> list[int | None]:
    """For each path, the number of its group of copies (0 .. n_originals-1), None if unreadable.

    ``n_originals`` is how many originals the pictures were made from; with one picture per
    original (or fewer) every picture is its own group.
    """
    return cached_per_file("copy-groups", f"{METHOD}/originals={n_originals}", files,
                           lambda files: _cluster(files, n_originals))


def _cluster(files: Sequence[str | os.PathLike], n_originals: int) -> list[int | None]:
    signatures = [colour_signature(path) for path in files]
    readable = [i for i, signature in enumerate(signatures) if signature is not None]
    groups: list[int | None] = [None] * len(files)
    if len(readable) <= n_originals:
        for number, i in enumerate(readable):
            groups[i] = number
        return groups
    labels = AgglomerativeClustering(n_clusters=n_originals, linkage="ward").fit_predict(
        np.stack([signatures[i] for i in readable]))
    for i, label in zip(readable, labels):
        groups[i] = int(label)
    return groups
