"""A lab's labels file, as the review page saves it (``labels.csv``) or as written by hand.

Format: a header row naming at least ``path`` and ``label`` (any order, any case; more
columns are ignored, except ``xmin, ymin, xmax, ymax``: a cell's box in a bigger picture, as
``count``'s review page writes it). ``path`` is absolute or relative to the CSV's folder;
``label`` is one of the checkpoint's classes (any case) or ``unsure`` (the technologist's
"unsure / not a white cell").

Nothing is dropped silently: every row that cannot be used is reported by its row number
(the line of the file; the header is row 1) and why: a malformed row (wrong number of
fields, empty path or label, a bad box), an unknown class, a missing file, an unreadable
picture, the same cell labelled twice; ``unsure`` rows are reported as skipped by the
technologist. Pictures are read as ``predict`` reads them (the checkpoint's crop and size).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from bloodcell_lib.modeling.loaded import LoadedModel
from bloodcell_lib.training.adapt import AdaptError

UNSURE = "unsure"  # the review page's label for "unsure / not a white cell"
BOX_COLUMNS = ("xmin", "ymin", "xmax", "ymax")


@dataclass
class LabelledCells:
    """``table``: row, path (absolute), label (a class), box (None or 4 ints), one per usable cell;
    ``images``: uint8 [N, 3, S, S] in the table's order; ``problems``: (row, reason) of rows not
    used; ``unsure``: rows the technologist marked unsure."""

    source: str
    table: pd.DataFrame
    images: torch.Tensor
    problems: list[tuple[int, str]] = field(default_factory=list)
    unsure: list[int] = field(default_factory=list)

    def notes(self) -> list[str]:
        lines = [f"{self.source} row {row}: {reason}; row not used" for row, reason in self.problems]
        lines += [f"{self.source} row {row}: skipped: marked unsure / not a white cell by the technologist"
                  for row in self.unsure]
        return lines


def _box(values: dict[str, str]) -> tuple[int, int, int, int] | None:
    """The row's box, None without one; ValueError for a partial or bad box."""
    given = [values.get(key, "").strip() for key in BOX_COLUMNS]
    if not any(given):
        return None
    try:
        box = tuple(int(float(v)) for v in given)
    except ValueError:
        raise ValueError(f"box {', '.join(given)} is not four numbers xmin, ymin, xmax, ymax") from None
    if box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"box {box} is empty (xmax <= xmin or ymax <= ymin)")
    return box


def _load(path: str, box: tuple[int, int, int, int] | None, loaded: LoadedModel) -> tuple[torch.Tensor | None, str]:
    """(uint8 tensor, "") or (None, reason): the picture (cropped to ``box``) as predict reads it."""
    from bloodcell_lib.data.images import ImageLoadError, load_rgb
    from bloodcell_lib.data.transforms import pil_to_uint8
    from bloodcell_lib.evaluation.pictures import _load_one, crop_like_training

    if box is None:
        tensor, _, reason = _load_one(path, loaded.image_size, loaded.data_config)
        return tensor, reason or ""
    try:
        image, _ = crop_like_training(load_rgb(path, box), loaded.data_config)
    except ImageLoadError as err:
        return None, err.reason
    return pil_to_uint8(image, loaded.image_size), ""


def read_labels(csv_path: str | os.PathLike, loaded: LoadedModel) -> LabelledCells:
    """The usable labelled cells of ``csv_path`` for the checkpoint of ``loaded`` and every row's
    problem. AdaptError when the file cannot be read or has no ``path,label`` header."""
    csv_path = Path(csv_path)
    classes = {name.lower(): name for name in loaded.class_names}
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise AdaptError(f"--labels {csv_path}: cannot be read ({err})") from err
    reader = csv.reader(text.splitlines(keepends=True))
    header = [name.strip().lower() for name in next(reader, [])]
    if "path" not in header or "label" not in header:
        raise AdaptError(f"--labels {csv_path}: the first row must be a header naming the columns path and label "
                         f"(as the review page saves labels.csv); found {', '.join(header) or 'an empty file'}")
    rows, problems, unsure, seen = [], [], [], {}
    images = []
    for values in reader:
        row = reader.line_num
        if not any(v.strip() for v in values):
            continue  # a blank line holds no label
        if len(values) != len(header):
            problems.append((row, f"malformed: {len(values)} field(s) where the header names {len(header)}"))
            continue
        record = dict(zip(header, values))
        path, label = record["path"].strip(), record["label"].strip()
        if not path or not label:
            problems.append((row, "malformed: empty " + ("path" if not path else "label")))
            continue
        try:
            box = _box(record)
        except ValueError as err:
            problems.append((row, f"malformed: {err}"))
            continue
        if label.lower() == UNSURE:
            unsure.append(row)
            continue
        if label.lower() not in classes:
            problems.append((row, f"unknown class {label!r} (the checkpoint's classes: {', '.join(loaded.class_names)})"))
            continue
        full = Path(path).expanduser()
        full = full if full.is_absolute() else csv_path.parent / full
        if not full.is_file():
            problems.append((row, f"no such file {full}"))
            continue
        key = (str(full.resolve()), box)
        if key in seen:
            problems.append((row, f"the same cell as row {seen[key]}, whose label is used"))
            continue
        tensor, reason = _load(str(full), box, loaded)
        if tensor is None:
            problems.append((row, f"{full}: {reason}"))
            continue
        seen[key] = row
        rows.append({"row": row, "path": str(full.resolve()), "label": classes[label.lower()], "box": box})
        images.append(tensor)
    size = loaded.image_size
    stacked = torch.stack(images) if images else torch.zeros((0, 3, size, size), dtype=torch.uint8)
    return LabelledCells(str(csv_path), pd.DataFrame(rows, columns=["row", "path", "label", "box"]), stacked,
                         problems, unsure)
