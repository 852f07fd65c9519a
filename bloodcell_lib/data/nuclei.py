"""Every white cell of a smear field, found by its stained nucleus.

``stain.nucleus_box`` keeps the one largest violet region (``stain.violet_mask``: a violet
score thresholded per picture, so the rule holds across labs' stains and cameras)
of a single-cell picture. A smear
field has red cells, platelets and zero, one or several white cells, so here every violet
region is kept that is large enough to be a nucleus, and regions lying close together are
joined: a neutrophil's lobes are separate blobs of one cell. Platelets are violet too, but
small; the size rules are fractions of the picture and of the largest nucleus found, so they
do not depend on the camera's resolution.

Each nucleus gives two boxes: ``nucleus`` (the violet pixels' extent) and ``cell`` (the whole
cell estimated as a square around the nucleus grown by ``CELL_MARGIN`` on every side, the
geometry of ``stain.cell_box``), which is what is drawn, counted and cropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from bloodcell_lib.data import stain
from bloodcell_lib.data.images import clamp_box
from bloodcell_lib.data.stain import Box, square_around, violet_mask

MIN_NUCLEUS_AREA = 0.004  # of the picture: platelets (and debris) stay below
MIN_RELATIVE_AREA = 0.25  # of the largest nucleus in the field: a lone small lobe is a platelet
LOBE_GAP = 0.25  # lobes closer than this x the largest nucleus' diameter belong to one cell
CELL_MARGIN = 0.10  # the cytoplasm around the nucleus, as a fraction of its longer side
METHOD = (f"{stain.METHOD}|violet-regions/area>={MIN_NUCLEUS_AREA}/rel>={MIN_RELATIVE_AREA}/gap={LOBE_GAP}"
          f"/cell-margin={CELL_MARGIN}")


@dataclass(frozen=True)
class Nucleus:
    """One white cell: its nucleus' box, its cell box (picture pixels) and its violet area
    (fraction of the picture)."""

    nucleus: Box
    cell: Box
    area: float


def _lobe_groups(violet: np.ndarray) -> tuple[np.ndarray, int]:
    """Violet regions labelled so that regions closer than ``LOBE_GAP`` x the largest region's
    diameter share a label (0 is background)."""
    regions, count = ndimage.label(violet)
    if count == 0:
        return regions, 0
    areas = ndimage.sum_labels(violet, regions, index=np.arange(1, count + 1))
    diameter = 2 * np.sqrt(areas.max() / np.pi)
    # Growing every region by half the gap makes regions within the gap touch.
    grown = ndimage.binary_dilation(violet, iterations=max(1, int(round(LOBE_GAP * diameter / 2))))
    groups, count = ndimage.label(grown)
    return np.where(violet, groups, 0), count


def find_nuclei(image: Image.Image) -> list[Nucleus]:
    """The white cells of a field, left to right; an empty list when none is found."""
    violet, factor = violet_mask(image)
    groups, count = _lobe_groups(violet)
    if count == 0:
        return []
    areas = ndimage.sum_labels(violet, groups, index=np.arange(1, count + 1)) / violet.size
    keep = (areas >= MIN_NUCLEUS_AREA) & (areas >= MIN_RELATIVE_AREA * areas.max())
    found = []
    for area, slices in zip(areas[keep], np.asarray(ndimage.find_objects(groups), dtype=object)[keep]):
        rows, cols = slices
        nucleus = tuple(float(factor * edge) for edge in (cols.start, rows.start, cols.stop, rows.stop))
        cell = square_around(nucleus, image.size, CELL_MARGIN)
        if cell is not None:
            found.append(Nucleus(nucleus, tuple(float(v) for v in cell), float(area)))
    return sorted(found, key=lambda n: (n.nucleus[0], n.nucleus[1]))


def crop_box(found: Nucleus, data_config: dict[str, Any], size: tuple[int, int]) -> Box:
    """The crop a checkpoint was trained on, for one found cell: ``crop: cell`` models saw the
    annotated cell box grown by crop_margin on every side; others (``stain``, whole pictures)
    the square of ``stain.cell_box`` around the nucleus; ``window`` models their fixed-pixel square
    centred on it."""
    margin = float(data_config.get("crop_margin", 0.15))
    if data_config.get("crop") == "window":
        side = int(data_config.get("crop_window", 200))
        xmin, ymin, xmax, ymax = found.nucleus
        return square_around(((xmin + xmax - side) / 2, (ymin + ymax - side) / 2,
                              (xmin + xmax + side) / 2, (ymin + ymax + side) / 2), size, 0.0)
    if data_config.get("crop") == "cell":
        xmin, ymin, xmax, ymax = found.cell
        dx, dy = margin * (xmax - xmin), margin * (ymax - ymin)
        return clamp_box((xmin - dx, ymin - dy, xmax + dx, ymax + dy), size)
    return square_around(found.nucleus, size, margin)
