"""Manifest loaders: one table of (image, label, split, leakage group) per data set.

Every loader ends in the same place (``_finish``), which checks that each file is a readable
image (header plus end marker, cheap), hashes its bytes to find byte-identical copies, and
turns every problem into a row of ``Manifest.dropped`` or a line of ``Manifest.notes``:
bad input is reported with the file and what was done, never skipped silently.

Leakage groups: byte-identical files share a group (the first 16 hex digits of their
SHA-256), and so do crops of one source image and, in Kaggle's dataset2, the augmented copies
of one original cell (found by colour, ``copies``: the file names count the originals but do
not name them), so a split that keeps groups together never puts one cell on both sides.
Byte-identical files filed under different classes have no trustworthy label and are dropped.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import NamedTuple, Sequence

import pandas as pd
from tqdm import tqdm

from bloodcell_lib.data.catalog import COLUMNS, CROPS, DATASETS, DROPPED_COLUMNS, STAIN_CROPS, Manifest
from bloodcell_lib.data.copies import copy_groups
from bloodcell_lib.core.fileio import sha256_file
from bloodcell_lib.data.images import clamp_box, probe_image
from bloodcell_lib.core.paths import DataNotFoundError, find_data_dir
from bloodcell_lib.data.stain import cell_boxes, window_boxes

# Where each named set may sit under a data root, and a folder that must exist inside it
# (so that "." -- the root is the set itself -- is only accepted when the set is really there).
LAYOUTS: dict[str, tuple[tuple[str, ...], str]] = {
    "kaggle": (("blood-cells/dataset2-master", "dataset2-master/dataset2-master", "dataset2-master", "."), "images"),
    "bccd": (("blood-cells/dataset-master", "dataset-master/dataset-master", "dataset-master", "."), "JPEGImages"),
    "pbc": (("pbc/PBC_dataset_normal_DIB", "PBC_dataset_normal_DIB", "."), ""),
    "lisc": (("lisc/LISC_crops", "LISC_crops", "."), ""),
    "krd": (("krd/KRD_WBC", "KRD_WBC", "."), ""),
}
# Named sets that are a folder per class (the ``folder`` loader at a known place).
FOLDER_SETS = ("pbc", "lisc", "krd")
KAGGLE_SPLITS = {"TRAIN": "train", "TEST": "test", "TEST_SIMPLE": "test_simple"}
# dataset2 file names: _<position in a shuffled batch of the folder's originals>_<random>.jpeg,
# so the first number takes as many values as the folder has originals.
KAGGLE_NAME = re.compile(r"^_(\d+)_\d+\.jpe?g$", re.IGNORECASE)
CSV_PATH_COLUMNS = ("path", "filepath", "file_path", "image_path", "filename", "file", "image")
CSV_LABEL_COLUMNS = ("label", "class", "category", "target")


class _Loaded(NamedTuple):
    """What a loader found before the common checks: candidate rows, drops, notes."""

    root: Path
    rows: list[dict]
    dropped: list[tuple[str, str, str]]
    notes: list[str]


def _row(path: Path | str, label: str, split: str = "", box: tuple | None = None,
         origin: str | None = None) -> dict:
    """One candidate row; ``origin`` names the source picture when copies of it were derived."""
    return {"path": str(path), "label": label, "split": split, "box": box, "origin": origin}


# --------------------------------------------------------------------------- locating data
def locate(name: str, root: str | os.PathLike | None = None) -> Path:
    """Folder of data set ``name`` under ``root`` (or the default data roots when None).

    An explicit ``root`` must hold the set: paths.find_data_dir would otherwise fall back to
    $BLOODCELL_DATA or ../shared/data and train on data the user did not point at.
    """
    layouts, marker = LAYOUTS[name]
    if root is None and not marker:
        layouts = tuple(layout for layout in layouts if layout != ".")  # "." would match any data root
    if root is not None and not Path(root).expanduser().is_dir():
        raise DataNotFoundError(f"data folder {root} does not exist (looking for data set '{name}')")
    found = find_data_dir([str(Path(layout, marker)) for layout in layouts], name, root)
    folder = found.parent if marker else found
    if root is not None and not folder.is_relative_to(Path(root).expanduser().resolve()):
        looked = ", ".join(str(Path(layout, marker)) for layout in layouts)
        raise DataNotFoundError(f"no '{name}' data set under {root}; looked for: {looked}")
    return folder


def detect(path: str | os.PathLike) -> list[str]:
    """Named data sets whose layout is present under ``path`` (without falling back elsewhere)."""
    path = Path(path)
    return [name for name, (layouts, marker) in LAYOUTS.items()
            if any((path / layout / marker).is_dir() for layout in layouts if layout != "." or marker)]


# --------------------------------------------------------------------------- loaders
def _scan_class_folders(folder: Path, split: str, notes: list[str]) -> list[dict]:
    """Rows for a folder-per-class tree: every file anywhere under ``folder/<class>/``.

    All files are candidates, not only known extensions, so a stray file is reported by the
    readability check instead of being skipped without a word.
    """
    rows: list[dict] = []
    entries = sorted(folder.iterdir())
    for class_dir in (entry for entry in entries if entry.is_dir()):
        if class_dir.name.startswith("."):
            notes.append(f"hidden folder {class_dir} ignored")
            continue
        files = sorted(path for path in class_dir.rglob("*") if path.is_file())
        if not files:
            notes.append(f"empty class folder {class_dir}: class '{class_dir.name}' has no images")
        rows += [_row(path, class_dir.name, split) for path in files]
    loose = [entry.name for entry in entries if entry.is_file()]
    if loose:
        notes.append(f"{len(loose)} file(s) directly in {folder} ignored (not in a class folder): "
                     + ", ".join(loose[:5]) + (" ..." if len(loose) > 5 else ""))
    return rows


def _with_kaggle_origins(rows: list[dict], notes: list[str]) -> list[dict]:
    """Each row's origin: its group of augmented copies within its class folder (``copies``)."""
    out = []
    for (split, label), members in pd.DataFrame(rows).groupby(["split", "label"], sort=False):
        names = [KAGGLE_NAME.match(Path(path).name) for path in members["path"]]
        if not all(names):
            notes.append(f"{split}/{label}: file names not in dataset2's _<k>_<n>.jpeg form, so the number "
                         "of originals is unknown; augmented copies are not grouped (byte-identical ones are)")
            out += members.to_dict("records")
            continue
        n_originals = len({match.group(1) for match in names})
        groups = copy_groups(members["path"].tolist(), n_originals)
        out += [{**row, "origin": None if group is None else f"{split}/{label}/copies-{group}"}
                for row, group in zip(members.to_dict("records"), groups)]
    return out


def _load_kaggle(root: str | os.PathLike | None) -> _Loaded:
    folder = locate("kaggle", root)
    notes: list[str] = []
    rows: list[dict] = []
    images = folder / "images"
    for entry in sorted(images.iterdir()):
        if entry.name in KAGGLE_SPLITS and entry.is_dir():
            rows += _scan_class_folders(entry, KAGGLE_SPLITS[entry.name], notes)
        else:
            notes.append(f"{entry} ignored: not one of the official split folders {', '.join(KAGGLE_SPLITS)}")
    missing = [name for name in KAGGLE_SPLITS if not (images / name).is_dir()]
    if missing:
        notes.append(f"official split folder(s) missing under {images}: {', '.join(missing)}")
    return _Loaded(folder, _with_kaggle_origins(rows, notes) if rows else rows, [], notes)


def _load_folder(root: str | os.PathLike | None, name: str) -> _Loaded:
    if name in FOLDER_SETS:
        folder = locate(name, root)
    elif root is None:
        raise ValueError("data set 'folder' needs the folder: pass root (config: data_dir)")
    else:
        folder = Path(root).expanduser().resolve()
        if not folder.is_dir():
            raise DataNotFoundError(f"data folder {root} does not exist")
    notes: list[str] = []
    return _Loaded(folder, _scan_class_folders(folder, "", notes), [], notes)


def _wbc_boxes(xml_path: Path, margin: float) -> tuple[list[tuple[float, ...]], str | None]:
    """WBC boxes of one Pascal-VOC file, each enlarged by ``margin`` x its size on every side.

    The margin keeps the cell's edge and some context; clamping to the image happens later,
    once the image size is known. Returns (boxes, problem) -- problem says why there are none.
    """
    try:
        objects = ET.parse(xml_path).getroot().iterfind("object")
    except FileNotFoundError:
        return [], f"no annotation file {xml_path.name}"
    except (ET.ParseError, OSError) as err:
        return [], f"annotation {xml_path.name} unreadable ({err})"
    boxes = []
    for obj in objects:
        if (obj.findtext("name") or "").strip() != "WBC":
            continue
        try:
            xmin, ymin, xmax, ymax = (float(obj.findtext(f"bndbox/{key}")) for key in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            return [], f"annotation {xml_path.name} has a WBC box without numeric coordinates"
        dx, dy = margin * (xmax - xmin), margin * (ymax - ymin)
        boxes.append((xmin - dx, ymin - dy, xmax + dx, ymax + dy))
    return boxes, None if boxes else f"no WBC box in {xml_path.name}"


def _load_bccd(root: str | os.PathLike | None, crop: str, margin: float) -> _Loaded:
    """BCCD: labels.csv (``,Image,Category``) with one label per image; multi-label rows dropped."""
    folder = locate("bccd", root)
    labels_csv = folder / "labels.csv"
    if not labels_csv.is_file():
        raise DataNotFoundError(f"{labels_csv} not found: the BCCD labels file is required")
    labels = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
    if not {"Image", "Category"} <= set(labels.columns):
        raise ValueError(f"{labels_csv}: expected columns Image and Category, found {list(labels.columns)}")
    rows: list[dict] = []
    dropped: list[tuple[str, str, str]] = []
    notes: list[str] = []
    for line, (number, category) in enumerate(zip(labels["Image"], labels["Category"]), start=2):
        where = f"labels.csv line {line}"
        if not number.strip().isdigit():
            dropped.append((f"{labels_csv}:{line}", f"{where}: Image value {number!r} is not an image number",
                            "malformed"))
            continue
        path = folder / "JPEGImages" / f"BloodImage_{int(number):05d}.jpg"
        names = [part.strip() for part in category.split(",") if part.strip()]
        if not names:
            dropped.append((str(path), f"{where}: no label", "no-label"))
        elif len(names) > 1:
            dropped.append((str(path), f"{where}: several cells labelled {category!r}; one label per image is needed",
                            "multi-label"))
        elif not path.is_file():
            dropped.append((str(path), f"{where}: image file missing", "missing"))
        elif crop == "cell":
            boxes, problem = _wbc_boxes(folder / "Annotations" / f"{path.stem}.xml", margin)
            if problem:
                notes.append(f"{path}: {problem}; whole image kept")
            rows += [_row(path, names[0], "", box) for box in boxes or [None]]
        else:
            rows.append(_row(path, names[0]))
    return _Loaded(folder, rows, dropped, notes)


def _pick_column(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    by_name = {column.strip().lower(): column for column in columns}
    return next((by_name[name] for name in candidates if name in by_name), None)


def _load_csv(csv_path: str | os.PathLike | None) -> _Loaded:
    """Any CSV of (path, label); relative paths are relative to the CSV's folder."""
    if csv_path is None:
        raise ValueError("data set 'csv' needs csv_path (a CSV with path and label columns)")
    csv_path = Path(csv_path).expanduser().resolve()
    if not csv_path.is_file():
        raise DataNotFoundError(f"CSV file {csv_path} not found")
    bad_lines: list[list[str]] = []
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8-sig",
                            skipinitialspace=True, engine="python", on_bad_lines=bad_lines.append)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise ValueError(f"{csv_path}: cannot be read as CSV ({err})") from err
    path_column = _pick_column(list(table.columns), CSV_PATH_COLUMNS)
    label_column = _pick_column(list(table.columns), CSV_LABEL_COLUMNS)
    if path_column is None or label_column is None:
        raise ValueError(
            f"{csv_path}: needs a path column (one of {', '.join(CSV_PATH_COLUMNS)}) and a label column "
            f"(one of {', '.join(CSV_LABEL_COLUMNS)}); columns found: {list(table.columns)}")
    dropped = [(f"{csv_path}: {','.join(fields)}", f"malformed CSV row ({len(fields)} fields, header has "
                f"{len(table.columns)})", "malformed") for fields in bad_lines]
    rows: list[dict] = []
    values = table[[path_column, label_column]].fillna("")
    for line, (value, label) in enumerate(zip(values[path_column], values[label_column]), start=2):
        value, label = value.strip(), label.strip()
        path = Path(os.path.abspath(csv_path.parent / value))
        if not value:
            dropped.append((f"{csv_path}:{line}", f"{csv_path.name} row {line}: no path", "missing"))
        elif not label:
            dropped.append((str(path), f"{csv_path.name} row {line}: no label", "no-label"))
        elif not path.is_file():
            dropped.append((str(path), f"{csv_path.name} row {line}: file not found", "missing"))
        else:
            rows.append(_row(path, label))
    return _Loaded(csv_path.parent, rows, dropped, [])


# --------------------------------------------------------------------------- common checks
class _FileInfo(NamedTuple):
    digest: str | None
    size: tuple[int, int] | None
    reason: str | None


@functools.lru_cache(maxsize=None)
def _inspect_cached(path: str, mtime_ns: int, nbytes: int) -> _FileInfo:
    """Keyed on mtime and size so an edited file is looked at again; kept in memory only."""
    size, reason = probe_image(path, full=False)
    return _FileInfo(sha256_file(path) if reason is None else None, size, reason)


def _inspect(path: str) -> _FileInfo:
    try:
        stat = os.stat(path)
    except OSError as err:
        return _FileInfo(None, None, f"cannot read file: {err.strerror or err}")
    return _inspect_cached(path, stat.st_mtime_ns, stat.st_size)


def _duplicate_sets(table: pd.DataFrame) -> list[dict]:
    """Each set of byte-identical files in ``table`` (one entry per file, crops collapsed)."""
    files = table.drop_duplicates(["path", "label"])
    sets = []
    for group, members in files.groupby("group", sort=False):
        if len(members) > 1:
            sets.append({"group": group, "paths": members["path"].tolist(), "labels": members["label"].tolist(),
                         "cross_class": members["label"].nunique() > 1})
    return sorted(sets, key=lambda entry: entry["paths"][0])


def _leakage_groups(digests: pd.Series, origins: pd.Series) -> pd.Series:
    """Digest groups merged wherever rows share an origin (connected components, union-find)."""
    parent: dict[str, str] = {}

    def find(key: str) -> str:
        while parent.setdefault(key, key) != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for digest, origin in zip(digests, origins):
        if isinstance(origin, str):
            a, b = find(digest), find("origin:" + origin)
            parent[max(a, b)] = min(a, b)
    # A digest is a stable, readable group name: use the smallest digest of each component.
    components: dict[str, str] = {}
    for digest in sorted(set(digests)):
        components.setdefault(find(digest), digest)
    return digests.map(lambda digest: components[find(digest)])


def _finish(name: str, loaded: _Loaded) -> Manifest:
    """Readability, boxes clamped to the image, leakage groups, ambiguous duplicates, order."""
    notes = list(loaded.notes)
    dropped = list(loaded.dropped)
    table = pd.DataFrame(loaded.rows, columns=["path", "label", "split", "box", "origin"])
    seen_classes = set(table["label"])

    repeated = table.duplicated(["path", "label", "split", "box"])
    dropped += [(path, "listed more than once; first entry kept", "repeated") for path in table.loc[repeated, "path"]]
    table = table[~repeated]

    info = {path: _inspect(path) for path in tqdm(table["path"].unique(), desc=f"checking {name}", disable=None)}
    bad = [path for path, found in info.items() if found.reason is not None]
    dropped += [(path, f"unreadable: {info[path].reason}", "unreadable") for path in bad]
    table = table[~table["path"].isin(bad)].copy()

    boxes = []
    for path, box in zip(table["path"], table["box"]):
        clamped = None if box is None else clamp_box(box, info[path].size)
        if box is not None and clamped is None:
            notes.append(f"{path}: crop box {box} lies outside the image; whole image kept")
        boxes.append(clamped)
    table["box"] = pd.Series(boxes, index=table.index, dtype=object)
    table["group"] = table["path"].map(lambda path: info[path].digest[:16])
    table["source"] = name

    duplicates = _duplicate_sets(table)
    for entry in (entry for entry in duplicates if entry["cross_class"]):
        members = ", ".join(f"{path} ({label})" for path, label in zip(entry["paths"], entry["labels"]))
        reason = f"byte-identical files with different labels: {members}; label ambiguous, all copies dropped"
        dropped += [(path, reason, "ambiguous-duplicate") for path in entry["paths"]]
        table = table[table["group"] != entry["group"]]
    table["group"] = _leakage_groups(table["group"], table["origin"])

    table = table.sort_values("path", kind="stable").reset_index(drop=True)[COLUMNS]
    classes = sorted(table["label"].unique())
    notes += [f"class '{label}' has no usable images left" for label in sorted(seen_classes - set(classes))]
    return Manifest(table, pd.DataFrame(dropped, columns=DROPPED_COLUMNS), name, loaded.root, classes,
                    notes, duplicates)


def load_manifest(name: str, root: str | os.PathLike | None = None, *, crop: str | None = None,
                  margin: float = 0.15, window: int = 200, csv_path: str | os.PathLike | None = None) -> Manifest:
    """Load data set ``name`` (kaggle, bccd, pbc, lisc, krd, folder, csv) as a Manifest.

    ``root``: a data root holding the set, or the set's folder itself (found under the default
    data roots when None; required for ``folder``). ``crop="cell"`` (bccd only) crops each
    annotated WBC box enlarged by ``margin`` x its size per side; ``crop="stain"`` (any set)
    crops a square around the stained nucleus found in each picture (``stain.cell_box``),
    ``crop="nucleus"`` the same with the nucleus's lobes joined, ``crop="window"`` a ``window``-pixel
    square centred on the nucleus (pictures no larger than that stay whole).
    ``csv_path`` (csv only) defaults to ``root``.
    """
    crop = crop or "none"
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; use one of: {', '.join(DATASETS)}")
    if crop not in CROPS:
        raise ValueError(f"crop = {crop!r} is not accepted; use one of: {', '.join(CROPS)}")
    if crop == "cell" and name != "bccd":
        raise ValueError(f"crop='cell' needs WBC box annotations, which only the bccd data set has (not {name!r})")
    if margin < 0:
        raise ValueError(f"margin = {margin!r} must be >= 0")
    if name == "multi":
        raise ValueError("data set 'multi' is made of other sets: load it with selection.load_manifest_for(config) "
                         "(config fields sources, test_source)")
    if name == "kaggle":
        loaded = _load_kaggle(root)
    elif name == "bccd":
        loaded = _load_bccd(root, crop, margin)
    elif name == "csv":
        loaded = _load_csv(csv_path if csv_path is not None else root)
    else:
        loaded = _load_folder(root, name)
    if crop in STAIN_CROPS:
        loaded = _with_stain_boxes(loaded, margin, crop == "nucleus")
    elif crop == "window":
        loaded = _with_window_boxes(loaded, window)
    return _finish(name, loaded)


def stain_boxes(paths: list[str], margin: float, join_lobes: bool = False) -> tuple[list[tuple | None], list[str]]:
    """The square around each picture's stained nucleus (None: whole picture), and a note
    naming the pictures where none was found."""
    boxes = cell_boxes(paths, margin, join_lobes)
    missed = [path for path, box in zip(paths, boxes) if box is None]
    if not missed:
        return boxes, []
    crop = "nucleus" if join_lobes else "stain"
    return boxes, [f"crop '{crop}': no stained nucleus found in {len(missed)} picture(s), whole picture kept: "
                   + ", ".join(missed[:5]) + (" ..." if len(missed) > 5 else "")]


def _with_stain_boxes(loaded: _Loaded, margin: float, join_lobes: bool) -> _Loaded:
    """Every row cropped to the square around its stained nucleus; whole picture where none."""
    boxes, notes = stain_boxes([row["path"] for row in loaded.rows], margin, join_lobes)
    rows = [{**row, "box": box} for row, box in zip(loaded.rows, boxes)]
    return loaded._replace(rows=rows, notes=[*loaded.notes, *notes])


def _with_window_boxes(loaded: _Loaded, side: int) -> _Loaded:
    """Every row cropped to the ``side``-pixel window around its nucleus (whole when not larger)."""
    boxes = window_boxes([row["path"] for row in loaded.rows], side)
    n_cropped = sum(box is not None for box in boxes)
    rows = [{**row, "box": box} for row, box in zip(loaded.rows, boxes)]
    note = f"crop 'window': {n_cropped} of {len(rows)} picture(s) larger than {side} px cropped to the window"
    return loaded._replace(rows=rows, notes=[*loaded.notes, note])


# --------------------------------------------------------------------------- config-driven
def drop_classes(manifest: Manifest, classes: list[str]) -> Manifest:
    """Manifest without ``classes``; each removal recorded in ``dropped`` (one entry per class)."""
    unknown = sorted(set(classes) - set(manifest.classes))
    if unknown:
        raise ValueError(f"drop_classes: {', '.join(unknown)} not in data set '{manifest.name}' "
                         f"(classes: {', '.join(manifest.classes)})")
    table = manifest.table
    removed = table["label"].isin(classes)
    counts = table.loc[removed, "label"].value_counts()
    extra = pd.DataFrame([(f"class {label}", f"{counts.get(label, 0)} image(s) dropped: listed in drop_classes",
                           "drop_classes") for label in sorted(classes)], columns=DROPPED_COLUMNS)
    return dataclasses.replace(
        manifest, table=table[~removed].reset_index(drop=True),
        dropped=pd.concat([manifest.dropped, extra], ignore_index=True),
        classes=[label for label in manifest.classes if label not in classes])


def rows_per_class(table: pd.DataFrame, per_class: int, *, seed: int, by: Sequence[str] = ("label",)) -> pd.DataFrame:
    """At most ``per_class`` rows of each ``by`` value (0: all), drawn with ``seed``; order kept."""
    if not per_class:
        return table.reset_index(drop=True)
    keep = table.sample(frac=1.0, random_state=seed).groupby(list(by), sort=False).head(per_class).index
    return table.loc[sorted(keep)].reset_index(drop=True)


def subset_per_class(manifest: Manifest, per_class: int, *, seed: int) -> Manifest:
    """At most ``per_class`` rows of each (split, class), drawn with ``seed``; order kept."""
    table = manifest.table
    subset = rows_per_class(table, per_class, seed=seed, by=("split", "label"))
    note = f"subset: at most {per_class} image(s) per class and split (seed {seed}): {len(subset)} of {len(table)} rows"
    return dataclasses.replace(manifest, table=subset, notes=[*manifest.notes, note])


def with_extra_training_images(manifest: Manifest, name: str, *, per_class: int = 0, crop: str = "none",
                               margin: float = 0.15, seed: int = 0) -> Manifest:
    """``manifest`` plus rows of data set ``name`` (default data roots) marked ``split="train"``
    with ``source=name``: only classes both sets share (names matched ignoring case, relabelled
    to ``manifest``'s spelling), at most ``per_class`` per class (0: all, else drawn with
    ``seed``). ``crop="stain"`` crops them by stain, anything else keeps whole pictures.
    ``splits.splits_for`` keeps such rows out of validation and test."""
    extra = load_manifest(name)
    spelling = {label.lower(): label for label in manifest.classes}
    table = extra.table[extra.table["label"].str.lower().isin(spelling)]
    if per_class:
        table = table.sample(frac=1.0, random_state=seed).groupby("label", sort=False).head(per_class)
    table = table.sort_values("path", kind="stable").reset_index(drop=True)
    table = table.assign(label=table["label"].str.lower().map(spelling), split="train")
    notes = [f"extra_train '{name}': {note}" for note in extra.notes]
    if crop in STAIN_CROPS:
        boxes, missed = stain_boxes(table["path"].tolist(), margin, crop == "nucleus")
        table["box"] = pd.Series(boxes, index=table.index, dtype=object)
        notes += [f"extra_train '{name}': {note}" for note in missed]
    counts = table["label"].value_counts()
    left_out = [label for label in extra.classes if label.lower() not in spelling]
    notes.append(f"extra_train: {len(table)} training-only image(s) of '{name}' added ("
                 + ", ".join(f"{label} {counts.get(label, 0)}" for label in manifest.classes) + ")"
                 + (f"; its classes {', '.join(left_out)} are not in '{manifest.name}' and left out" if left_out else ""))
    return dataclasses.replace(manifest, table=pd.concat([manifest.table, table[COLUMNS]], ignore_index=True),
                               dropped=pd.concat([manifest.dropped, extra.dropped], ignore_index=True),
                               notes=[*manifest.notes, *notes])

