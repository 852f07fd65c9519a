"""One manifest made of several labs' sets (``dataset: multi``), on the classes they share.

Each source is loaded by its own loader (every check and drop note kept, prefixed with the
source), its class names mapped onto sources.SHARED_CLASSES (the rest left out, one
``dropped`` entry per class), its leakage groups prefixed with the source (``pbc:<group>``)
so groups of different sets never merge by accident, and each capped at ``per_class``
pictures per class. Every source is cropped the same way (``crop``): one scale rule in every
lab, the one ``predict`` applies to an unseen lab's pictures, which have no annotated boxes.
The split (which lab is held out) is splits.source_splits.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pandas as pd

from bloodcell_lib.data.catalog import COLUMNS, DROPPED_COLUMNS, MULTI_CROPS, MULTI_SOURCES, STAIN_CROPS, Manifest
from bloodcell_lib.data.datasets import load_manifest, stain_boxes
from bloodcell_lib.data.sources import SHARED_CLASSES, shared_class


def _on_shared_classes(manifest: Manifest) -> tuple[pd.DataFrame, list[tuple[str, str, str]]]:
    """``manifest``'s rows relabelled to the shared classes; the other classes as drop entries."""
    table = manifest.table.assign(label=manifest.table["label"].map(shared_class))
    counts = manifest.table.loc[table["label"].isna(), "label"].value_counts()
    dropped = [(f"{manifest.name} class {label}", f"{count} image(s) left out: not one of the shared classes "
                f"{', '.join(SHARED_CLASSES)}", "drop_classes") for label, count in sorted(counts.items())]
    return table[table["label"].notna()], dropped


def _capped(table: pd.DataFrame, per_class: int, seed: int) -> pd.DataFrame:
    if not per_class:
        return table
    return table.sample(frac=1.0, random_state=seed).groupby("label", sort=False).head(per_class)


def _one_source(name: str, crop: str, margin: float, per_class: int, seed: int) -> Manifest:
    manifest = load_manifest(name)
    table, dropped = _on_shared_classes(manifest)
    table = _capped(table, per_class, seed).sort_values("path", kind="stable")
    table = table.assign(group=name + ":" + table["group"], source=name, split="")
    notes = [f"{name}: {note}" for note in manifest.notes]
    if crop in STAIN_CROPS:  # found only for the pictures kept (PBC has 15,000)
        boxes, missed = stain_boxes(table["path"].tolist(), margin, crop == "nucleus")
        table["box"] = pd.Series(boxes, index=table.index, dtype=object)
        notes += [f"{name}: {note}" for note in missed]
    counts = table["label"].value_counts()
    notes.append(f"{name}: {len(table)} picture(s)" + (f" (at most {per_class} per class, seed {seed})"
                                                       if per_class else "") + ": "
                 + ", ".join(f"{label} {counts.get(label, 0)}" for label in SHARED_CLASSES))
    extra = pd.DataFrame(dropped, columns=DROPPED_COLUMNS)
    return dataclasses.replace(manifest, table=table[COLUMNS], notes=notes,
                               dropped=pd.concat([manifest.dropped, extra], ignore_index=True))


def load_multi(sources: list[str], *, crop: str = "nucleus", margin: float = 0.5, per_class: int = 0,
               seed: int = 0, held_out: str | None = None, held_out_per_class: int = 0) -> Manifest:
    """The rows of every source in ``sources`` (each one of MULTI_SOURCES, default data roots),
    on the shared classes, cropped by ``crop`` (none, stain or nucleus), at most ``per_class``
    pictures per class and source (0: all); the ``held_out`` source (a leave-one-lab-out
    run's test lab) at most ``held_out_per_class`` instead (0: every picture it has)."""
    unknown = [name for name in sources if name not in MULTI_SOURCES]
    if unknown or not sources:
        raise ValueError(f"sources {sources!r}: use some of {', '.join(MULTI_SOURCES)}")
    if crop not in MULTI_CROPS:
        raise ValueError(f"crop = {crop!r}: a multi-source set is cropped by one of {', '.join(MULTI_CROPS)} "
                         "(the same rule in every lab; only bccd has annotated boxes)")
    parts = [_one_source(name, crop, margin, held_out_per_class if name == held_out else per_class, seed)
             for name in sources]
    table = pd.concat([part.table for part in parts], ignore_index=True)
    return Manifest(table.reset_index(drop=True), pd.concat([part.dropped for part in parts], ignore_index=True),
                    "multi", Path(os.path.commonpath([part.root for part in parts])), sorted(table["label"].unique()),
                    [note for part in parts for note in part.notes],
                    [entry for part in parts for entry in part.duplicates])
