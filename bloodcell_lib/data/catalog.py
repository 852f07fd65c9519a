"""What every data module agrees on, with no loader behind it: the named data sets and crops,
which sets share images, the manifest's columns and the Manifest itself.

A leaf (it imports only sources): the single-set loaders (datasets), the multi-lab set
(multisource), splits, the audit and the training config all read these, so none of them
needs another to know what the accepted values are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bloodcell_lib.data.sources import LABS, same_lab

DATASETS = ("kaggle", "bccd", "pbc", "lisc", "krd", "folder", "csv", "multi")
# cell: the annotated WBC box (bccd); stain: found by colour (stain.py); nucleus: the stain crop
# with a nucleus's lobes joined (stain.LOBE_GAP), the same cell scale in every lab; window: a
# fixed-pixel square centred on the nucleus (stain.window_box), the same view of a cell whether
# a picture is an analyser's prepared crop or its native export.
CROPS = ("none", "cell", "stain", "nucleus", "window")
STAIN_CROPS = ("stain", "nucleus")
# Named data sets and those whose images overlap them (the sets of one lab, sources.LABS: Kaggle
# dataset2 is made by augmenting the BCCD originals): a run never trains on, or starts from
# weights trained on, one of them.
SAME_IMAGES = {name: same_lab(name) for name in LABS}
# The sources a multi-source set can combine, one per lab. Kaggle dataset2 is augmented copies
# of the BCCD originals (its own lab's stand-in is bccd); it stays a single-source set.
MULTI_SOURCES = ("pbc", "bccd", "lisc", "krd")
MULTI_CROPS = ("none", "stain", "nucleus")  # "cell" needs boxes, which only bccd has

COLUMNS = ["path", "label", "split", "group", "source", "box"]
DROPPED_COLUMNS = ["item", "reason", "kind"]


@dataclass
class Manifest:
    """A data set as a table (see DEVELOPERS.md) plus everything that was left out and why.

    ``dropped`` has columns item (a file, or CSV file:line), reason, and kind: one of
    unreadable, missing, no-label, multi-label, malformed, repeated, ambiguous-duplicate,
    drop_classes -- so the audit can count each defect. ``duplicates`` lists each set of
    byte-identical files (group, paths, labels, cross_class), the ambiguous cross-class ones
    included even though their rows were dropped.
    """

    table: pd.DataFrame
    dropped: pd.DataFrame
    name: str
    root: Path
    classes: list[str]
    notes: list[str] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)
