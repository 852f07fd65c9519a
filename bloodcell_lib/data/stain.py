"""Where the white cell is, found by its stain: ``crop: stain`` for pictures without boxes.

In Romanowsky-stained smears (Wright, Giemsa, May-Grunwald) a white cell's nucleus is the
largest violet region. Red cells are pink (or grey-mauve), platelets are small. How violet a
nucleus looks depends on the lab: PBC's and BCCD's are blue well above red, KRD-WBC's phone
photographs purple with blue barely above red, on a grey-green background. So the rule is a
score and a threshold set per picture, not fixed colour limits: the violet score
(R + 3B)/4 - G (a stained nucleus absorbs green above all; weighting blue over red keeps
pink red cells and eosinophil granules low), thresholded at half the picture's strongest stain
(its 99.5th percentile) but never below VIOLET_FLOOR, so that a picture with no stained cell
(grey background, pink red cells) finds nothing. Measured per lab by
``benchmarks/cell_finding.py`` (docs/counting.md, "Finding the cell in every lab").

Kaggle's dataset2 shifts, rotates and zooms each copy, so the cell can sit anywhere in
the 320x240 frame and fills a tenth of it; squeezing the whole frame to 128 px leaves the cell
about 30 px wide. Cropping a square around the nucleus first gives the network the cell at
several times the detail, for the same compute.

A picture with no violet region at all keeps its whole frame (the loader says so).

``join_lobes`` (crop ``nucleus``): a segmented neutrophil's or an eosinophil's nucleus is two
to five lobes with pale gaps between them, so the largest violet region is one lobe and the
square comes out a third of the cell (seen on PBC and LISC). Joining violet regions that lie
within LOBE_GAP x the picture's side of each other finds the whole nucleus, so the square's side is a fixed multiple
of the nucleus in every lab: the cell lands at the same pixel scale whatever the microscope.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from bloodcell_lib.core.derived import cached_per_file
from bloodcell_lib.data.images import ImageLoadError, clamp_box, load_rgb

VIOLET_FLOOR = 30.0  # the violet score (R + 3B)/4 - G a nucleus pixel must at least reach
STRONGEST = 99.5  # percentile of the picture's violet score taken as its strongest stain
RELATIVE = 0.5  # a nucleus pixel scores at least this x the picture's strongest stain
MIN_BRIGHTNESS = 120  # R+G+B; the black fill of rotated copies is not stain
MIN_AREA = 0.002  # a region must cover this much of the picture to count as a nucleus
WORKING_SIDE = 120  # the search runs on the picture shrunk to about this shorter side
METHOD = (f"violet-score/(r+3b)/4-g>max({VIOLET_FLOOR},{RELATIVE}xp{STRONGEST})/v={MIN_BRIGHTNESS}/a={MIN_AREA}"
          f"/side={WORKING_SIDE}/whole-pixels")

LOBE_GAP = 0.05  # x the shrunk picture's shorter side: lobes this close belong to one nucleus

Box = tuple[float, float, float, float]


def violet_mask(image: Image.Image) -> tuple[np.ndarray, int]:
    """The stained-nucleus pixels of the picture shrunk by ``factor`` (returned with it):
    (mask, factor); a mask pixel (r, c) covers picture pixels factor*r .. factor*(r+1).
    A pixel is stain when its violet score (R + 3B)/4 - G exceeds both VIOLET_FLOOR and
    RELATIVE x the picture's STRONGEST-th percentile score (the black fill excluded)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    # A nucleus is tens of pixels wide: a shrunk copy finds it as well, several times faster.
    factor = max(1, min(rgb.size) // WORKING_SIDE)
    rgb = rgb.reduce(factor) if factor > 1 else rgb
    pixels = np.asarray(rgb, dtype=np.float32)
    score = (pixels[..., 0] + 3 * pixels[..., 2]) / 4 - pixels[..., 1]
    lit = pixels.sum(axis=-1) > MIN_BRIGHTNESS
    strongest = float(np.percentile(score[lit], STRONGEST)) if lit.any() else 0.0
    violet = lit & (score > max(VIOLET_FLOOR, RELATIVE * strongest))
    # Opening drops single pixels and thin edges of red cells that pass the colour test.
    return ndimage.binary_opening(violet), factor


def nucleus_box(image: Image.Image, join_lobes: bool = False) -> Box | None:
    """(xmin, ymin, xmax, ymax) of the largest violet region (with ``join_lobes``: of the
    largest group of violet regions within LOBE_GAP x the picture's side of each other), or None when there is none."""
    violet, factor = violet_mask(image)
    # Regions are labelled on the widened mask (lobes touch there) and measured on the real one.
    gap = max(1, round(LOBE_GAP * min(violet.shape) / 2))  # each region grows by half the gap
    regions, count = ndimage.label(ndimage.binary_dilation(violet, iterations=gap) if join_lobes else violet)
    regions[~violet] = 0
    if count == 0:
        return None
    areas = ndimage.sum_labels(violet, regions, index=np.arange(1, count + 1))
    largest = int(np.argmax(areas))
    if areas[largest] < MIN_AREA * violet.size:
        return None
    rows, cols = ndimage.find_objects(regions)[largest]
    return tuple(float(factor * edge) for edge in (cols.start, rows.start, cols.stop, rows.stop))


def cell_box(image: Image.Image, margin: float, join_lobes: bool = False) -> Box | None:
    """A square around the nucleus, ``margin`` x its longer side added on every side (the
    cytoplasm and granules lie around the nucleus), moved inside the picture where it can be,
    in whole pixels (rounded outwards, as ``images.clamp_box`` makes every box)."""
    nucleus = nucleus_box(image, join_lobes)
    return None if nucleus is None else square_around(nucleus, image.size, margin)


def square_around(nucleus: Box, size: tuple[int, int], margin: float) -> Box | None:
    """``cell_box``'s square for a given nucleus box in a picture of ``size`` (w, h)."""
    width, height = size
    xmin, ymin, xmax, ymax = nucleus
    side = min(max(xmax - xmin, ymax - ymin) * (1 + 2 * margin), width, height)
    left = min(max((xmin + xmax - side) / 2, 0.0), width - side)
    top = min(max((ymin + ymax - side) / 2, 0.0), height - side)
    return clamp_box((left, top, left + side, top + side), size)


def _boxes(files: Sequence[str | os.PathLike], margin: float, join_lobes: bool) -> list[list[float] | None]:
    out: list[list[float] | None] = []
    for path in files:
        try:
            box = cell_box(load_rgb(path), margin, join_lobes)
        except ImageLoadError:
            box = None  # unreadable: the loader's own check reports the file
        out.append(None if box is None else list(box))
    return out


def cell_boxes(files: Sequence[str | os.PathLike], margin: float, join_lobes: bool = False) -> list[Box | None]:
    """``cell_box`` of every file (None where no stain was found or the file is unreadable)."""
    method = f"{METHOD}/margin={margin}" + (f"/lobes={LOBE_GAP}" if join_lobes else "")
    answers = cached_per_file("stain-boxes", method, files, lambda files: _boxes(files, margin, join_lobes))
    return [None if box is None else tuple(box) for box in answers]



WINDOW_WHOLE = "window: whole picture (not larger than the window)"
WINDOW_FOUND = "window: centred on the nucleus"
WINDOW_CENTRE = "window: centred on the picture (no nucleus found)"


class Window(NamedTuple):
    """Where ``crop: window`` looks: ``box`` (None: the whole picture), ``note`` (how it was
    placed: WINDOW_*) and ``nucleus`` (the nucleus box it was centred on, None when not found)."""

    box: Box | None
    note: str
    nucleus: Box | None


def window_box(image: Image.Image, side: int) -> Window:
    """``crop: window``: a ``side`` x ``side`` pixel square centred on the nucleus (lobes joined),
    at the picture's own pixel scale, moved inside the picture. A picture no larger than the
    window is used whole (box None), so an analyser's prepared crop and its native export, which
    shows more around the same cell, give the model the same view. Without a nucleus the window
    is centred on the picture (analysers centre the cell)."""
    width, height = image.size
    nucleus = nucleus_box(image, join_lobes=True)
    if width <= side and height <= side:
        return Window(None, WINDOW_WHOLE, nucleus)
    cx, cy = ((width / 2, height / 2) if nucleus is None
              else ((nucleus[0] + nucleus[2]) / 2, (nucleus[1] + nucleus[3]) / 2))
    w, h = min(side, width), min(side, height)
    left = min(max(round(cx - w / 2), 0), width - w)
    top = min(max(round(cy - h / 2), 0), height - h)
    return Window((left, top, left + w, top + h), WINDOW_FOUND if nucleus is not None else WINDOW_CENTRE, nucleus)


def nucleus_side(nucleus: Box | None) -> float:
    """The nucleus box's longer side in pixels (NaN when there is none)."""
    return float("nan") if nucleus is None else float(max(nucleus[2] - nucleus[0], nucleus[3] - nucleus[1]))


def nucleus_sides(files: Sequence[str | os.PathLike]) -> list[float]:
    """``nucleus_side`` of every file's nucleus (lobes joined; NaN: none found or unreadable)."""
    def sides(files):
        out = []
        for path in files:
            try:
                out.append(nucleus_side(nucleus_box(load_rgb(path), join_lobes=True)))
            except ImageLoadError:
                out.append(float("nan"))
        return [None if np.isnan(v) else v for v in out]

    answers = cached_per_file("nucleus-sides", f"{METHOD}/lobes={LOBE_GAP}", files, sides)
    return [float("nan") if v is None else float(v) for v in answers]


def _window_boxes(files: Sequence[str | os.PathLike], side: int) -> list[list[float] | None]:
    out: list[list[float] | None] = []
    for path in files:
        try:
            box = window_box(load_rgb(path), side).box
        except ImageLoadError:
            box = None  # unreadable: the loader's own check reports the file
        out.append(None if box is None else list(box))
    return out


def window_boxes(files: Sequence[str | os.PathLike], side: int) -> list[Box | None]:
    """``window_box`` of every file (None: the whole picture)."""
    method = f"{METHOD}/lobes={LOBE_GAP}/window={side}"
    answers = cached_per_file("window-boxes", method, files, lambda files: _window_boxes(files, side))
    return [None if box is None else tuple(box) for box in answers]
