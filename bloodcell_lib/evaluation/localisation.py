"""Does the stain rule find the white cell in every lab's pictures? One table, one row a lab.

``found``: the share of single-cell pictures in which ``stain.nucleus_box`` (lobes joined)
finds a nucleus (PBC's 200x200 crops and its native 360x363 exports, LISC, Kaggle dataset2's
TEST copies, KRD-WBC; the five shared white-cell classes). Every one of these pictures holds a
white cell, so anything below 1 is a miss. ``side``: the median longer side (picture pixels)
of the nuclei found, the scale ``crop: nucleus`` squares are cut at.

Where the cell's place is known it is scored too, one to one at IoU >= ``field_scores.MIN_IOU``:
KRD-WBC's masks (the box of the mask thresholded at 128 is the cell): ``cell_iou`` is the share
of pictures whose ``nucleus_box`` square (``nuclei.CELL_MARGIN`` on every side) overlaps the
mask box, ``recall``/``precision`` those of ``nuclei.find_nuclei`` against it; BCCD's annotated
WBC boxes give ``find_nuclei``'s recall and precision (``field_scores.detection_scores``).
No model is involved. ``every`` keeps every n-th picture of each lab (sorted) to save time;
BCCD's 364 fields are always scored whole.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from bloodcell_lib.core.paths import data_root_candidates
from bloodcell_lib.data.images import load_rgb
from bloodcell_lib.data.nuclei import CELL_MARGIN, find_nuclei
from bloodcell_lib.data.stain import Box, nucleus_box, nucleus_side, square_around
from bloodcell_lib.evaluation.field_scores import MIN_IOU, bccd_fields, detect_fields, detection_scores, iou, match_boxes

WHITE_CELLS = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
# lab -> folder under a data root holding one folder per class
LAB_FOLDERS = {"pbc": "pbc/PBC_dataset_normal_DIB", "pbc-native": "pbc-native/PBC_native_360x363",
               "lisc": "lisc/LISC_crops", "kaggle": "blood-cells/dataset2-master/images/TEST",
               "krd": "krd/KRD_WBC"}
KRD_MASKS = "krd/masks"
COLUMNS = ["lab", "pictures", "found", "side", "cell_iou", "cells", "detected", "recall", "precision"]


def _root(root: str | Path | None, folder: str) -> Path | None:
    candidates = [Path(root)] if root is not None else [path for _, path in data_root_candidates()]
    return next((path for path in candidates if (path / folder).is_dir()), None)


def lab_pictures(lab: str, root: str | Path | None = None, every: int = 1) -> list[Path]:
    """Every ``every``-th picture of the lab's white-cell classes (sorted; [] when absent)."""
    base = _root(root, LAB_FOLDERS[lab])
    if base is None:
        return []
    files = sorted(path for path in (base / LAB_FOLDERS[lab]).iterdir() if path.is_dir()
                   and path.name.lower() in WHITE_CELLS for path in path.iterdir() if path.is_file()
                   and not path.name.startswith("."))
    return files[::every]


def mask_box(mask: Path | Image.Image) -> Box | None:
    """The box of a KRD mask's cell pixels (grey level >= 128), None when it has none."""
    pixels = np.asarray((mask if isinstance(mask, Image.Image) else Image.open(mask)).convert("L")) >= 128
    if not pixels.any():
        return None
    rows, cols = np.flatnonzero(pixels.any(axis=1)), np.flatnonzero(pixels.any(axis=0))
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def krd_mask_path(picture: Path) -> Path:
    """``KRD_WBC/<class>/imageN.jpg`` -> ``masks/maskN.jpg`` beside ``KRD_WBC``."""
    return picture.parent.parent.parent / "masks" / picture.name.replace("image", "mask")


def found_share(pictures: Sequence[Path]) -> tuple[float, float]:
    """(share of pictures with a nucleus, median longer side in pixels of the nuclei found)."""
    sides = [nucleus_side(nucleus_box(load_rgb(p), join_lobes=True)) for p in pictures]
    found = [side for side in sides if not np.isnan(side)]
    return (len(found) / len(sides) if sides else float("nan"), float(np.median(found)) if found else float("nan"))


def krd_scores(pictures: Sequence[Path]) -> dict:
    """found, cell_iou and find_nuclei's recall/precision against the mask boxes."""
    found = hit = cells = detected = matched = 0
    sides = []
    for picture in pictures:
        mask = krd_mask_path(picture)
        truth = mask_box(mask) if mask.is_file() else None
        image = load_rgb(picture)
        nucleus = nucleus_box(image, join_lobes=True)
        found += nucleus is not None
        if nucleus is not None:
            sides.append(nucleus_side(nucleus))
        if truth is None:
            continue
        cells += 1
        square = None if nucleus is None else square_around(nucleus, image.size, CELL_MARGIN)
        hit += square is not None and iou(square, truth) >= MIN_IOU
        boxes = [n.cell for n in find_nuclei(image)]
        detected += len(boxes)
        matched += len(match_boxes(boxes, [truth]))
    n = len(pictures)
    return {"pictures": n, "found": found / n if n else float("nan"),
            "side": float(np.median(sides)) if sides else float("nan"),
            "cell_iou": hit / cells if cells else float("nan"), "cells": cells, "detected": detected,
            "recall": matched / cells if cells else float("nan"),
            "precision": matched / detected if detected else float("nan")}


def localisation_table(root: str | Path | None = None, every: int = 3) -> pd.DataFrame:
    """One row per lab present: lab, pictures, found, side (median nucleus side, px), cell_iou, cells, detected, recall,
    precision (NaN where a lab does not give the number)."""
    rows = []
    for lab in ("pbc", "pbc-native", "lisc", "kaggle"):
        pictures = lab_pictures(lab, root, every)
        if pictures:
            found, side = found_share(pictures)
            rows.append({"lab": lab, "pictures": len(pictures), "found": found, "side": side})
    krd = lab_pictures("krd", root, every)
    if krd:
        rows.append({"lab": "krd", **krd_scores(krd)})
    try:
        fields = bccd_fields(str(root) if root is not None else None)
    except Exception:  # noqa: BLE001 - no BCCD here: the row is left out
        fields = []
    if fields:
        scores = detection_scores(detect_fields(fields))
        rows.append({"lab": "bccd", "pictures": scores["fields"], "cells": scores["annotated_cells"],
                     "detected": scores["found_cells"], "recall": scores["recall"], "precision": scores["precision"]})
    return pd.DataFrame(rows, columns=COLUMNS)


def as_markdown(table: pd.DataFrame) -> str:
    """The table as Markdown (shares to 3 decimals, blank where a lab has no such number)."""
    shares = {"found", "cell_iou", "recall", "precision"}
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    for row in table.itertuples(index=False):
        cells = []
        for column, value in zip(table.columns, row):
            if isinstance(value, (float, np.floating)) and np.isnan(value):
                cells.append("")
            elif column in shares:
                cells.append(f"{value:.3f}")
            else:
                cells.append(str(int(round(value))) if isinstance(value, (float, np.floating, int, np.integer)) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
