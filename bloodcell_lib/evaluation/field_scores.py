"""How well ``count`` does on BCCD's annotated fields: detection and typing of every white cell.

Detection: each found cell box against the annotated WBC boxes (Pascal-VOC), matched one to
one, best IoU first; a match needs IoU >= 0.5. No model is involved.

Typing: labels.csv gives each field's cell types ("NEUTROPHIL, EOSINOPHIL" for two cells) but
not which box is which, so a field counts as correctly typed when the multiset of predicted
types of its matched cells equals its labels. Only fields the checkpoint never learnt from are
scored: those of the run's test split (``split.csv`` beside the checkpoint) and the
multi-label fields, which the training manifest leaves out altogether.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw

from bloodcell_lib.data.datasets import _wbc_boxes, locate
from bloodcell_lib.data.images import load_rgb
from bloodcell_lib.data.nuclei import METHOD, crop_box, find_nuclei
from bloodcell_lib.evaluation.engines import Engine
from bloodcell_lib.evaluation.predict import engine_of, predict_tensors

MIN_IOU = 0.5


@dataclass(frozen=True)
class Field:
    path: str
    annotated: tuple  # WBC boxes (xmin, ymin, xmax, ymax)
    labels: tuple  # cell types from labels.csv ("" where the field has no row)


def bccd_fields(root: str | None = None) -> list[Field]:
    """Every BCCD field that has both a picture and an annotation file, in file order."""
    folder = locate("bccd", root)
    table = pd.read_csv(folder / "labels.csv", dtype=str, keep_default_na=False)
    labels = {int(n): tuple(p.strip() for p in c.split(",") if p.strip())
              for n, c in zip(table["Image"], table["Category"]) if n.strip().isdigit()}
    fields = []
    for xml in sorted((folder / "Annotations").glob("*.xml")):
        picture = folder / "JPEGImages" / f"{xml.stem}.jpg"
        if picture.is_file():
            boxes, _ = _wbc_boxes(xml, 0.0)  # no WBC box is an answer here, not a problem
            fields.append(Field(str(picture), tuple(boxes), labels.get(int(xml.stem.split("_")[-1]), ())))
    return fields


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_boxes(found: Sequence, annotated: Sequence) -> list[tuple[int, int]]:
    """(found index, annotated index) pairs with IoU >= MIN_IOU, one to one, best IoU first."""
    pairs = sorted(((iou(f, a), i, j) for i, f in enumerate(found) for j, a in enumerate(annotated)), reverse=True)
    used_found, used_annotated, matched = set(), set(), []
    for overlap, i, j in pairs:
        if overlap >= MIN_IOU and i not in used_found and j not in used_annotated:
            used_found.add(i), used_annotated.add(j)
            matched.append((i, j))
    return matched


def detect_fields(fields: Sequence[Field]) -> pd.DataFrame:
    """One row per field: path, annotated, found, matched, missed and spurious box lists, and
    the found cells (``nuclei.Nucleus``) for classification."""
    rows = []
    for field in fields:
        found = find_nuclei(load_rgb(field.path))
        matched = match_boxes([n.cell for n in found], field.annotated)
        hit_found, hit_annotated = {i for i, _ in matched}, {j for _, j in matched}
        rows.append({"path": field.path, "annotated": len(field.annotated), "found": len(found),
                     "matched": len(matched), "labels": field.labels, "nuclei": found, "pairs": matched,
                     "missed": [a for j, a in enumerate(field.annotated) if j not in hit_annotated],
                     "spurious": [n.cell for i, n in enumerate(found) if i not in hit_found]})
    return pd.DataFrame(rows)


def detection_scores(detected: pd.DataFrame) -> dict[str, Any]:
    """Recall, precision and counts over all fields, and the fields with an error."""
    tp, annotated, found = (int(detected[c].sum()) for c in ("matched", "annotated", "found"))
    errors = detected[(detected["matched"] != detected["annotated"]) | (detected["matched"] != detected["found"])]
    return {"fields": len(detected), "annotated_cells": annotated, "found_cells": found, "matched": tp,
            "recall": tp / annotated if annotated else float("nan"),
            "precision": tp / found if found else float("nan"), "min_iou": MIN_IOU,
            "fields_with_errors": [{"field": Path(r.path).name, "annotated": r.annotated, "found": r.found,
                                    "matched": r.matched} for r in errors.itertuples(index=False)]}


def run_checkpoints(run_dir: str | Path) -> list[Path]:
    """The kept checkpoint of a run, or of each of its cross-validation folds."""
    run_dir = Path(run_dir)
    single = run_dir / "checkpoint_best.pt"
    found = [single] if single.is_file() else sorted(run_dir.glob("fold_*/checkpoint_best.pt"))
    if not found:
        raise FileNotFoundError(f"no checkpoint_best.pt in {run_dir} or its fold_* folders: train the run first")
    return found


def unseen_fields(checkpoint: str | Path) -> set[str]:
    """The fields a checkpoint never trained on: the test rows of its run's split.csv."""
    split = Path(checkpoint).parent / "split.csv"
    if not split.is_file():
        raise FileNotFoundError(f"{split} not found: without the run's split the fields it trained on are unknown")
    table = pd.read_csv(split, dtype=str, keep_default_na=False)
    return set(table.loc[table["split"] == "test", "path"])


def _typed_fields(runner: Engine, fair: pd.DataFrame) -> pd.DataFrame:
    """``fair`` (rows of ``detect_fields``) with the predicted types of their matched cells."""
    from bloodcell_lib.data.transforms import pil_to_uint8

    loaded = runner.loaded
    crops, owners = [], []
    for row in fair.itertuples():
        image = load_rgb(row.path)
        for i, _ in row.pairs:
            crops.append(pil_to_uint8(image.crop(crop_box(row.nuclei[i], loaded.data_config, image.size)),
                                      loaded.image_size))
            owners.append(row.Index)
    proba = predict_tensors(runner, torch.stack(crops)) if crops else np.zeros((0, 1))
    predicted = {index: [] for index in fair.index}
    for owner, k in zip(owners, proba.argmax(axis=1)):
        predicted[owner].append(loaded.class_names[k])
    fair = fair.assign(predicted=[tuple(sorted(predicted[i])) for i in fair.index])
    return fair.assign(correct=[Counter(p) == Counter(l) for p, l in zip(fair["predicted"], fair["labels"])])


def typing_scores(checkpoints: Sequence[str | Path], detected: pd.DataFrame, device: str = "cpu") -> dict[str, Any]:
    """Field-level typing, each field by a checkpoint that never trained on it: a fold's test
    fields by that fold, the multi-label fields (in no split) by the first checkpoint.
    Two-cell fields (two annotated WBC boxes) are scored apart."""
    parts, done = [], set()
    for n, checkpoint in enumerate(checkpoints):
        unseen = unseen_fields(checkpoint)
        fair = detected[[bool(r.labels) and r.path not in done and (r.path in unseen or (n == 0 and len(r.labels) > 1))
                         for r in detected.itertuples(index=False)]]
        done |= set(fair["path"])
        parts.append(_typed_fields(engine_of(checkpoint, device, None), fair))
    typed = pd.concat(parts)
    single = typed[(typed["annotated"] == 1) & (typed["labels"].map(len) == 1)]
    two = typed[typed["annotated"] == 2]
    both_found = two[two["matched"] == 2]
    return {"checkpoints": [str(c) for c in checkpoints], "fields_scored": len(typed),
            "fields_correct": int(typed["correct"].sum()),
            "single_cell_fields": len(single), "single_cell_correct": int(single["correct"].sum()),
            "single_cell_accuracy": float(single["correct"].mean()) if len(single) else float("nan"),
            "two_cell_fields": len(two), "two_cell_both_found": len(both_found),
            "two_cell_both_found_and_typed": int(both_found["correct"].sum()),
            "two_cell_detail": [{"field": Path(r.path).name, "labels": ", ".join(r.labels),
                                 "predicted": ", ".join(r.predicted), "matched": r.matched}
                                for r in two.itertuples(index=False)]}


def error_gallery(detected: pd.DataFrame, kind: str, columns: int = 8, tile: int = 112) -> Image.Image | None:
    """Tiles of the ``kind`` ("missed" or "spurious") boxes, each captioned with its field; None if none."""
    boxes = [(row.path, box) for row in detected.itertuples(index=False) for box in getattr(row, kind)]
    if not boxes:
        return None
    rows = -(-len(boxes) // columns)
    sheet = Image.new("RGB", (columns * tile, rows * (tile + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, (path, box) in enumerate(boxes):
        x, y = tile * (n % columns), (tile + 14) * (n // columns)
        sheet.paste(load_rgb(path, box).resize((tile, tile)), (x, y))
        draw.text((x + 2, y + tile), Path(path).stem.replace("BloodImage_", ""), fill=(0, 0, 0))
    return sheet


def count_section(detection: dict[str, Any], typing: dict[str, Any]) -> dict[str, Any]:
    """The ``count`` section of an experiment's record (metrics.json): both sets of numbers."""
    return {"method": METHOD, "detection": dict(detection), "typing": dict(typing)}
