"""The review page: one self-contained HTML file on which a technologist labels cells.

``write_review_page(rows, class_names, out_path, title)`` writes a page that works offline
from ``file://`` (no server, no CDN): its CSS and JavaScript ship in this package
(``templates/review.css``, ``templates/review.js``, rendered into ``templates/review.html.j2``
by Jinja2 with autoescaping), and the cells travel as JSON in a
``<script type="application/json">`` block (Jinja2's ``tojson``: ``<``, ``>``, ``&`` and
``'`` escaped, so no file name can close the block). Each cell's picture is embedded once as
a small JPEG thumbnail (``THUMB_SIZE`` px, base64), never the full picture.

On the page: a grid of the cells with the predicted class and confidence, flagged cells
first; a click on a class button or one key (1-9, in the legend's class order) labels the
selected cell and moves to the next, 0 or x marks it "unsure / not a white cell", arrow keys
move; filters by flag, by predicted class and by labelled state; a progress line; and
"Save labels", which downloads ``labels.csv`` (``path,label``, one row per labelled cell,
``unsure`` for unsure cells; cells of smear fields add their box ``xmin,ymin,xmax,ymax``).
``bloodcell adapt --labels labels.csv`` reads that file. Thumbnails are decoded only when
they scroll into view, so a page of thousands of cells opens in about a second.

The page lives in ``evaluation`` (not ``reporting``) because ``predict``, ``count`` and
``suggest`` write it, and a stage imports only from the stages before it.
"""
from __future__ import annotations

import base64
import hashlib
import io
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jinja2

from bloodcell_lib.core.fileio import atomic_write_text
from bloodcell_lib.data.images import clamp_box, load_rgb

TEMPLATES_DIR = Path(__file__).with_name("templates")
THUMB_SIZE = 128  # px, the longer side; readable on screen, about 4 kB as JPEG
THUMB_QUALITY = 82
UNSURE = "unsure"  # the label of a cell marked "unsure / not a white cell"
MAX_KEYED_CLASSES = 9  # keys 1-9; more classes are labelled by their buttons


def thumbnail(image: Any, box: Sequence[float] | None = None, size: int = THUMB_SIZE) -> str:
    """Base64 JPEG of a PIL picture (cropped to ``box``), its longer side ``size`` px."""
    if box is not None:
        image = image.crop(clamp_box(tuple(box), image.size) or (0, 0, image.width, image.height))
    else:
        image = image.copy()
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=THUMB_QUALITY)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _box(row: Mapping[str, Any]) -> list[int] | None:
    if "box" in row and row["box"] is not None:
        return [int(v) for v in row["box"]]
    if all(key in row for key in ("xmin", "ymin", "xmax", "ymax")):
        return [int(row[key]) for key in ("xmin", "ymin", "xmax", "ymax")]
    return None


def page_cells(rows: Iterable[Mapping[str, Any]], *, thumb_size: int = THUMB_SIZE) -> list[dict[str, Any]]:
    """The page's cell records, flagged cells first (otherwise in the given order): path
    (absolute), predicted, confidence, flag (bool), reason, box or None, thumb (base64 or None)."""
    cells = []
    picture: tuple[str, Any] = ("", None)  # the last picture decoded: a field's cells come one after another
    for row in rows:
        box = _box(row)
        if picture[0] != str(row["path"]):
            try:
                picture = (str(row["path"]), load_rgb(row["path"]))
            except Exception:  # the page shows "no preview"; the cell can still be labelled
                picture = (str(row["path"]), None)
        flag = bool(row.get("needs_review", False))
        reason = row.get("reason", row.get("review_reason", ""))
        cells.append({"path": str(Path(str(row["path"])).resolve()), "predicted": str(row.get("predicted", "")),
                      "confidence": round(float(row.get("confidence", float("nan"))), 4),
                      "flag": flag, "reason": "" if reason is None or reason != reason else str(reason),
                      "box": box, "thumb": None if picture[1] is None else thumbnail(picture[1], box, thumb_size)})
    cells.sort(key=lambda cell: not cell["flag"])  # stable: flagged first, each part in its order
    return cells


def render_review_page(cells: list[dict[str, Any]], class_names: Sequence[str], title: str) -> str:
    """The page's HTML from ``page_cells`` records."""
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES_DIR), autoescape=True)
    page_id = hashlib.sha256("\n".join(cell["path"] for cell in cells).encode()).hexdigest()[:16]
    data = {"title": title, "classes": list(class_names), "unsure": UNSURE, "page_id": page_id,
            "keyed": min(len(class_names), MAX_KEYED_CLASSES), "cells": cells}
    return environment.get_template("review.html.j2").render(title=title, data=data, n_cells=len(cells))


def write_review_page(rows: Iterable[Mapping[str, Any]], class_names: Sequence[str], out_path: str | os.PathLike,
                      title: str = "Review cells", *, thumb_size: int = THUMB_SIZE) -> Path:
    """Write the review page of ``rows`` to ``out_path`` (atomically); returns the path.

    ``rows``: mappings (e.g. ``DataFrame.to_dict("records")``) with ``path`` and optionally
    ``predicted``, ``confidence``, ``needs_review`` (bool) and ``reason`` (or
    ``review_reason``), and a cell box in a bigger picture as ``box`` or
    ``xmin, ymin, xmax, ymax`` (count's cells). ``class_names``: the label buttons, in key order.
    """
    if not class_names:
        raise ValueError("write_review_page needs the class names (the label buttons)")
    html = render_review_page(page_cells(rows, thumb_size=thumb_size), class_names, title)
    return atomic_write_text(out_path, html)
