"""Robustness to acquisition changes: a run's in-lab test cells re-photographed, in effect.

Each change is applied to the *original picture file* (the whole file as a user has it; for
a model trained on annotated boxes, ``crop: cell``, the annotated box, since a field holds
several cells), before the model's input contract: ``pictures.frame_like_training`` (its
``crop_like_training`` plus the nucleus size: a stain, nucleus or window crop is found again in
the changed picture, as in a user's picture) and then ``transforms.pil_to_uint8``; the review
flags read what the framing found, as ``predict`` does. The changes (``CORRUPTIONS``, a small typed table): rescaling
(another objective or camera pixel size), JPEG quality, defocus, colour temperature (white
balance), gamma, sensor noise and rotation; corruptions by albumentations, rescaling by PIL.

The cells: the run's split.csv test rows (a cross-validated run: its first fold's), at most
``per_class`` per class drawn with the experiment's seed; each original is decoded once and
the loaded model reused for every change. One view (no test-time augmentation): the numbers
are compared with the ``clean`` row, scored the same way. Per row: n, accuracy, the share of
cells the review flags accept (not ``needs_review``), the accuracy of those, and the accuracy
drop against the clean row.

For a run with PBC cells (``dataset: pbc``, or ``multi`` with pbc among its sources) the
``native framing`` rows score PBC's original 360x363 exports (``pbc-native/``, the files a
CellaVision user has) of the cells in the run's *test* split next to the same cells' 200x200
prepared crops; native files of cells in training or validation, or outside the run's split
(a class the model lacks, a capped source), are left out and counted by reason.
"""
from __future__ import annotations

import os
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from bloodcell_lib.modeling.loaded import CROPPING_MODES, LoadedModel, load_checkpoint

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations asks PyPI on import otherwise

LEVELS = ("mild", "moderate", "severe")
CLEAN, NATIVE = "clean", "native framing"
NATIVE_EXPORT, PREPARED_CROP = "native export (360x363)", "prepared crop (200x200)"
NATIVE_FOLDER = Path("pbc-native") / "PBC_native_360x363"
PER_CLASS = 40
SPLIT_NAMES = {"train": "training", "val": "validation"}
TABLE_COLUMNS = ("change", "severity", "level", "n", "accuracy", "accepted share", "accuracy accepted",
                 "accuracy drop", "vs", "no crop found")
ROW_KEYS = ("change", "severity", "level", "n", "accuracy", "accepted_share", "accuracy_accepted",
            "accuracy_drop", "vs", "crop_missed")


@dataclass(frozen=True)
class Corruption:
    """One acquisition change at one severity: ``fn`` maps an RGB picture to the changed RGB
    picture (deterministic: random ones are seeded by the picture's own pixels). ``strength``:
    how far from the original, in the change's own unit (grows with ``level`` within a change)."""

    name: str
    severity_label: str
    level: str  # one of LEVELS
    fn: Callable[[Image.Image], Image.Image]
    strength: float = 0.0


def _albumentation(make: Callable[[], Any], *, seeded: bool = False,
                   params: dict[str, Any] | None = None) -> Callable[[Image.Image], Image.Image]:
    """An albumentations transform (``make()``, p=1) as a picture -> picture function; a new
    transform per call (thread-safe), seeded by the picture's pixels where it draws noise;
    with ``params`` its ``apply`` at those parameters (a transform that only samples a range)."""
    def apply(img: Image.Image) -> Image.Image:
        pixels = np.asarray(img.convert("RGB"))
        transform = make()
        if seeded:
            transform.set_random_seed(zlib.crc32(pixels.tobytes()))
        out = transform.apply(pixels, **params) if params else transform(image=pixels)["image"]
        return Image.fromarray(np.ascontiguousarray(out))

    return apply


def rescaled(factor: float) -> Callable[[Image.Image], Image.Image]:
    """The picture ``factor`` times its size (bicubic, antialiased when shrinking)."""
    def apply(img: Image.Image) -> Image.Image:
        size = (max(1, round(img.width * factor)), max(1, round(img.height * factor)))
        return img.resize(size, Image.Resampling.BICUBIC)

    return apply


def _rotated_90(img: Image.Image) -> Image.Image:
    return img.transpose(Image.Transpose.ROTATE_90)


def corruptions() -> tuple[Corruption, ...]:
    """The table of changes and severities (albumentations imported here, on first use)."""
    import albumentations as A
    import cv2

    def jpeg(q: int) -> Corruption:
        return Corruption("JPEG quality", f"quality {q}", {95: "mild", 60: "moderate", 30: "severe"}[q],
                          _albumentation(lambda: A.ImageCompression(compression_type="jpeg", quality_range=(q, q),
                                                                    p=1.0)), 100 - q)

    def defocus(radius: int, level: str) -> Corruption:
        return Corruption("defocus blur", f"radius {radius} px", level, _albumentation(
            lambda: A.Defocus(radius=(radius, radius), alias_blur=(0.1, 0.1), p=1.0)), radius)

    def temperature(kelvin: int, level: str) -> Corruption:  # warmer light than daylight (~6500 K)
        return Corruption("colour temperature", f"{kelvin} K", level, _albumentation(
            lambda: A.PlanckianJitter(mode="blackbody", temperature_limit=(3000, 15000), p=1.0),
            params={"temperature": kelvin}), 6500 - kelvin)

    def gamma(value: float, level: str) -> Corruption:
        return Corruption("gamma", f"gamma {value:g}", level, _albumentation(
            lambda: A.RandomGamma(gamma_limit=(value * 100, value * 100), p=1.0)), abs(np.log(value)))

    def noise(std: float, level: str) -> Corruption:
        return Corruption("sensor noise", f"Gaussian sd {std * 255:.0f}/255", level, _albumentation(
            lambda: A.GaussNoise(std_range=(std, std), mean_range=(0.0, 0.0), per_channel=True, p=1.0),
            seeded=True), std)

    def rotation(degrees: float, level: str) -> Corruption:
        return Corruption("rotation", f"{degrees:g} deg, reflect border", level, _albumentation(
            lambda: A.Rotate(limit=(degrees, degrees), border_mode=cv2.BORDER_REFLECT_101, p=1.0)), degrees)

    def scale(factor: float, level: str) -> Corruption:
        return Corruption("rescale", f"{factor:g}x", level, rescaled(factor), abs(float(np.log(factor))))

    return (
        scale(0.8, "mild"), scale(1.25, "mild"), scale(0.6, "moderate"), scale(1.6, "moderate"),
        jpeg(95), jpeg(60), jpeg(30),
        defocus(1, "mild"), defocus(2, "moderate"), defocus(4, "severe"),
        temperature(5500, "mild"), temperature(4500, "moderate"), temperature(3500, "severe"),
        gamma(0.8, "mild"), gamma(1.25, "mild"), gamma(0.7, "moderate"), gamma(1.4, "moderate"),
        noise(0.02, "mild"), noise(0.04, "moderate"), noise(0.08, "severe"),
        Corruption("rotation", "90 deg", "mild", _rotated_90, 0.0), rotation(33, "moderate"),
    )


# --------------------------------------------------------------------------- pictures in, scores out
@dataclass
class Cells:
    """Decoded originals of the scored cells: ``pictures`` (RGB), their ``labels``, and
    ``crop``: whether the model's crop is found again in each (False: the picture is already
    the annotated box the model was trained on)."""

    pictures: list[Image.Image]
    labels: list[str]
    crop: list[bool]
    notes: list[str] = field(default_factory=list)


def finds_own_crop(data_config: dict[str, Any]) -> bool:
    """Whether the model's crop is found in each picture (stain, nucleus, window: found again
    in a changed picture); a ``crop: cell`` model's annotated boxes are not."""
    return data_config.get("crop") in CROPPING_MODES and data_config.get("crop") != "cell"


def decode_cells(table: pd.DataFrame, data_config: dict[str, Any]) -> Cells:
    """Each row's original decoded once: the whole file, or its annotated ``box`` for a model
    that does not find its own crop (a ``crop: cell`` or whole-picture model trained on boxes).
    Undecodable files are left out with a note."""
    from bloodcell_lib.data.images import ImageLoadError, load_rgb

    own_crop = finds_own_crop(data_config)
    cells = Cells([], [], [])
    for row in table.itertuples(index=False):
        annotated = getattr(row, "box", None) is not None and not own_crop
        try:
            cells.pictures.append(load_rgb(row.path, row.box if annotated else None))
        except ImageLoadError as err:
            cells.notes.append(f"{row.path} not scored: {err.reason}")
            continue
        cells.labels.append(str(row.label))
        cells.crop.append(not annotated)
    return cells


def model_inputs(cells: Cells, change: Callable[[Image.Image], Image.Image] | None, loaded: LoadedModel,
                 pool: ThreadPoolExecutor) -> tuple[Any, pd.DataFrame]:
    """uint8 batch [N, 3, S, S] of the changed pictures through the model's input contract
    (``pictures.frame_like_training``, then ``transforms.pil_to_uint8``), and what the framing
    found per picture as ``predict`` records it (columns ``crop`` and ``nucleus_px``; none for a
    model that does not crop), which the review flags read."""
    import torch

    from bloodcell_lib.data.transforms import pil_to_uint8
    from bloodcell_lib.evaluation.pictures import frame_like_training

    size = loaded.image_size

    def one(i: int) -> tuple[Any, str | None, float]:
        img = cells.pictures[i] if change is None else change(cells.pictures[i])
        if not cells.crop[i]:
            return pil_to_uint8(img, size), None, float("nan")
        framed = frame_like_training(img, loaded.data_config)
        return pil_to_uint8(framed.image, size), framed.note, framed.nucleus_px

    done = list(pool.map(one, range(len(cells.pictures))))
    found = pd.DataFrame({"crop": [note for _, note, _ in done], "nucleus_px": [px for _, _, px in done]})
    if loaded.crop is None or not any(cells.crop):
        found = found[[]]
    if not done:
        return torch.zeros((0, 3, size, size), dtype=torch.uint8), found
    return torch.stack([tensor for tensor, _, _ in done]), found


def score_batch(loaded: LoadedModel, images: Any, labels: Sequence[str],
                found: pd.DataFrame | None = None) -> dict[str, Any]:
    """n, accuracy, accepted_share (not needs_review, the flags reading ``found`` as ``predict``
    does; None without review thresholds), accuracy_accepted and crop_missed (pictures whose
    crop found no cell; None for a model that does not crop) of one uint8 batch, one view."""
    from bloodcell_lib.evaluation.predict import input_checks, proba_and_ood, scored_views, with_review_columns
    from bloodcell_lib.evaluation.strangers import label_indices_or_unknown
    from bloodcell_lib.modeling.review import NO_CELL

    found = pd.DataFrame(index=range(len(labels))) if found is None else found.reset_index(drop=True)
    proba, ood = proba_and_ood(*scored_views(loaded, images, tta=False, with_ood=bool(loaded.review)), loaded)
    truth = label_indices_or_unknown(pd.Series(list(labels)), list(loaded.class_names))
    correct = proba.argmax(axis=1) == truth if len(truth) else np.zeros(0, dtype=bool)
    frame = with_review_columns(found.assign(correct=correct), proba, ood, loaded)
    missed = input_checks(found, proba, loaded).get(NO_CELL)
    out: dict[str, Any] = {"n": int(len(truth)), "accuracy": float(correct.mean()) if len(truth) else None,
                           "accepted_share": None, "accuracy_accepted": None,
                           "crop_missed": None if missed is None else int(np.sum(missed))}
    if "needs_review" in frame and len(frame):
        accepted = ~frame["needs_review"].to_numpy(dtype=bool)
        out["accepted_share"] = float(accepted.mean())
        out["accuracy_accepted"] = float(correct[accepted].mean()) if accepted.any() else None
    return out


def score_change(loaded: LoadedModel, cells: Cells, corruption: Corruption | None,
                 pool: ThreadPoolExecutor) -> dict[str, Any]:
    """One table row: ``corruption`` (None: the clean row) applied to every cell, then scored."""
    images, found = model_inputs(cells, corruption.fn if corruption else None, loaded, pool)
    return {"change": corruption.name if corruption else CLEAN,
            "severity": corruption.severity_label if corruption else "none",
            "level": corruption.level if corruption else "none",
            **score_batch(loaded, images, cells.labels, found)}


# --------------------------------------------------------------------------- native framing (PBC)
def has_pbc_cells(config: dict[str, Any]) -> bool:
    """Whether a run's split holds PBC cells (``dataset: pbc``, or ``multi`` with pbc)."""
    return config.get("dataset") == "pbc" or (config.get("dataset") == "multi" and "pbc" in (config.get("sources") or []))


def native_root() -> Path | None:
    """``pbc-native/PBC_native_360x363`` under the first data root that has it, else None."""
    from bloodcell_lib.core.paths import data_root_candidates

    return next((root / NATIVE_FOLDER for _, root in data_root_candidates() if (root / NATIVE_FOLDER).is_dir()), None)


def _cell_key(path: str | os.PathLike) -> tuple[str, str]:
    """(class folder, file name): the same cell under pbc/ and pbc-native/."""
    path = Path(path)
    return path.parent.name, path.name


def native_cells(split: pd.DataFrame, folder: str | os.PathLike, *, per_class: int = 0,
                 seed: int = 0) -> tuple[pd.DataFrame, dict[str, int]]:
    """The native files whose cell (same class folder and file name as a PBC row of ``split``)
    is in the run's *test* split: columns native (path of the export), path (the prepared crop
    as in split.csv), label (the split's, so a multi run's shared class) and box; at most
    ``per_class`` per label (0: all). Also the files left out, counted by reason."""
    from bloodcell_lib.data.datasets import rows_per_class

    pbc = split if "source" not in split else split[split["source"].astype(str).isin(["pbc", ""])]
    by_key = {_cell_key(row.path): row for row in pbc.itertuples(index=False)}
    model_classes = {str(label).lower() for label in split["label"]}
    excluded: dict[str, int] = {}
    kept = []
    for native in sorted(Path(folder).glob("*/*")):
        if not native.is_file():
            continue
        row = by_key.get(_cell_key(native))
        if row is None:
            reason = (f"class {native.parent.name}: not one of the run's classes" if native.parent.name.lower()
                      not in model_classes else "not in the run's split (a capped or subset source)")
        elif row.split != "test":
            reason = f"in the run's {SPLIT_NAMES.get(row.split, row.split)} split"
        else:
            kept.append({"native": str(native), "path": row.path, "label": row.label, "box": row.box})
            continue
        excluded[reason] = excluded.get(reason, 0) + 1
    table = pd.DataFrame(kept, columns=["native", "path", "label", "box"])
    capped = rows_per_class(table, per_class, seed=seed) if len(table) else table
    if len(capped) < len(table):
        excluded[f"over the cap of {per_class} test cells per class"] = len(table) - len(capped)
    return capped, excluded


def native_rows(loaded: LoadedModel, table: pd.DataFrame, pool: ThreadPoolExecutor) -> tuple[list[dict[str, Any]], list[str]]:
    """The ``native framing`` rows: the exports, then the same cells' prepared crops (the
    exports' accuracy drop is counted against the crops)."""
    rows, notes = [], []
    for severity, paths in ((PREPARED_CROP, table["path"]), (NATIVE_EXPORT, table["native"])):
        cells = decode_cells(table.assign(path=paths, box=None), loaded.data_config)
        rows.append({**score_change(loaded, cells, None, pool), "change": NATIVE, "severity": severity,
                     "level": "native"})
        notes += cells.notes
    rows[0]["accuracy_drop"], rows[0]["vs"] = None, None  # other cells than the clean row's
    rows[1]["accuracy_drop"], rows[1]["vs"] = _drop(rows[0], rows[1]), PREPARED_CROP
    return rows[::-1], notes


def _drop(reference: dict[str, Any], row: dict[str, Any]) -> float | None:
    if reference.get("accuracy") is None or row.get("accuracy") is None:
        return None
    return float(reference["accuracy"] - row["accuracy"])


# --------------------------------------------------------------------------- a run
@dataclass
class RobustnessResult:
    """``rows``: one per change (keys ``ROW_KEYS``), the clean row first; ``native_excluded``:
    native files left out, by reason (None: the run has no PBC cells, or no native files)."""

    experiment: str
    rows: list[dict[str, Any]]
    per_class: int
    n_cells: int
    seconds: float
    checkpoint: str
    notes: list[str] = field(default_factory=list)
    native_excluded: dict[str, int] | None = None

    def table(self) -> pd.DataFrame:
        """The rows as a DataFrame with ``TABLE_COLUMNS``."""
        return robustness_frame(self.rows)

    def caption(self) -> str:
        """What the table shows: cells, model, and the native files scored and left out."""
        text = (f"Robustness of {self.experiment}: {self.n_cells} test cells (at most {self.per_class} per class), "
                "one view each; accuracy drop against the clean row")
        return text + (f"; {native_note(self)}" if native_note(self) else ".")

    def max_moderate_drop(self) -> float | None:
        """The largest accuracy drop of any change at moderate severity (the study's target)."""
        drops = [r["accuracy_drop"] for r in self.rows if r["level"] == "moderate" and r["accuracy_drop"] is not None]
        return max(drops) if drops else None


def robustness_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Record rows (``ROW_KEYS``) as the displayed table (``TABLE_COLUMNS``)."""
    frame = pd.DataFrame([[row.get(key) for key in ROW_KEYS] for row in rows], columns=list(TABLE_COLUMNS))
    for column in ("accuracy", "accepted share", "accuracy accepted", "accuracy drop"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)  # None -> NaN: shown blank
    return frame.astype({"n": int, "no crop found": "Int64"})


def score_cells(loaded: LoadedModel, table: pd.DataFrame, changes: Sequence[Corruption], *,
                threads: int = 2) -> tuple[list[dict[str, Any]], list[str]]:
    """The clean row and one row per change of ``table``'s cells (path, label, box), each
    original decoded once; the accuracy drop of each change against the clean row."""
    cells = decode_cells(table, loaded.data_config)
    if not all(cells.crop):
        cells.notes.append(f"{cells.crop.count(False)} cell(s) changed as their annotated box (the crop the model "
                           "was trained on), not cropped again")
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        clean = score_change(loaded, cells, None, pool)
        rows = [clean] + [score_change(loaded, cells, change, pool) for change in changes]
    for row in rows:
        row["accuracy_drop"], row["vs"] = _drop(clean, row), CLEAN
    return rows, cells.notes


def rows_of_split(split: pd.DataFrame | str | os.PathLike, *, per_class: int, seed: int) -> pd.DataFrame:
    """The test rows of a split table (or split.csv), at most ``per_class`` per class drawn with ``seed``."""
    from bloodcell_lib.data.datasets import rows_per_class
    from bloodcell_lib.data.splits import load_split

    split = split if isinstance(split, pd.DataFrame) else load_split(split)
    return rows_per_class(split[split["split"].astype(str) == "test"], per_class, seed=seed)


def robustness_study(cfg: Any, *, per_class: int = PER_CLASS, device: str | None = None,
                     changes: Sequence[Corruption] | None = None, threads: int | None = None) -> RobustnessResult:
    """The experiment ``cfg``'s kept checkpoint (a cross-validated run: fold 1's) on at most
    ``per_class`` test cells per class of its split.csv under every change of ``changes``
    (default ``corruptions()``), and for a run with PBC cells the native framing rows.
    ``device``: default the experiment's (``auto``: a GPU where torch sees one); ``threads``
    change and frame pictures at once (default: the machine's cores, at most 8)."""
    from bloodcell_lib.core.distributed import resolve_device
    from bloodcell_lib.data.splits import load_split
    from bloodcell_lib.modeling.rundir import KEPT_CHECKPOINT, fold_dirs
    start = time.perf_counter()
    run_dir = (fold_dirs(cfg.run_dir) or [Path(cfg.run_dir)])[0]
    loaded = load_checkpoint(run_dir / KEPT_CHECKPOINT, str(resolve_device(device or getattr(cfg, "device", "auto"))))
    threads = threads or min(8, os.cpu_count() or 1)
    split = load_split(run_dir / "split.csv")
    rows, notes = score_cells(loaded, rows_of_split(split, per_class=per_class, seed=cfg.seed),
                              corruptions() if changes is None else changes, threads=threads)
    excluded = None
    folder = native_root() if has_pbc_cells(loaded.config or {"dataset": cfg.dataset, "sources": cfg.sources}) else None
    if folder is not None:
        table, excluded = native_cells(split, folder, per_class=per_class, seed=cfg.seed)
        if len(table):
            with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
                more, more_notes = native_rows(loaded, table, pool)
            rows, notes = rows + more, notes + more_notes
        else:
            notes.append("native framing: no native PBC file's cell is in this run's test split")
    for note in notes:
        print(f"note: {note}", file=sys.stderr, flush=True)
    return RobustnessResult(cfg.name, rows, per_class, int(rows[0]["n"]), round(time.perf_counter() - start, 2),
                            str(run_dir / KEPT_CHECKPOINT), notes, excluded)


def record_fields(result: RobustnessResult) -> dict[str, Any]:
    """What the experiment record gains: ``robustness`` (rows, cells, the largest moderate drop)."""
    return {"robustness": {"rows": [{key: row.get(key) for key in ROW_KEYS} for row in result.rows],
                           "per_class": result.per_class, "n_cells": result.n_cells, "tta": False,
                           "checkpoint": result.checkpoint, "seconds": result.seconds, "notes": result.notes,
                           "native_excluded": result.native_excluded,
                           "max_moderate_drop": result.max_moderate_drop()}}


def native_note(result: RobustnessResult) -> str | None:
    """One line saying which native PBC files were scored and which were left out, and why."""
    if result.native_excluded is None:
        return None
    scored = next((r["n"] for r in result.rows if r["change"] == NATIVE), 0)
    left = ", ".join(f"{n} {reason}" for reason, n in result.native_excluded.items()) or "none"
    return f"native framing: {scored} PBC cells of the run's test split, native files left out: {left}."
