"""Image sources and the labs they come from, and the white-cell classes they share.

A source is a named data set; a lab is where its pictures were taken (microscope, camera,
stain). Two sources of one lab share images or at least a look (Kaggle's dataset2 is made by
augmenting the BCCD originals), so anything that keeps a test set apart -- extra training
images, starting weights, a leave-one-lab-out split -- works on labs, not on source names.
"""
from __future__ import annotations

# source -> lab. The lab names say where: Barcelona (CellaVision DM96), the BCCD lab (BCCD's
# smear photographs and Kaggle dataset2 made from them), Tehran (LISC), Erbil (KRD-WBC: Taha,
# Alizadeh & Mohammad, Mendeley Data v2 (2023), doi:10.17632/jzdj6h7gms.2, CC BY 4.0).
LABS = {"pbc": "barcelona-cellavision", "bccd": "bccd-lab", "kaggle": "bccd-lab", "lisc": "tehran-lisc",
        "krd": "erbil-krd"}

# The five white-cell types every lab here labels (PBC's ig, erythroblast and platelet, and
# classes a custom set may add, stay in single-source models).
SHARED_CLASSES = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")

# A held-out lab's class with fewer cells than this is kept in its test split but left out of
# the leave-one-lab-out scores (KRD-WBC has one basophil: its recall would be 0 or 1 and move a
# balanced accuracy over five classes by 0.2). Every score that leaves a class out says so.
MIN_CLASS_CELLS = 10


def lab_of(source: str) -> str:
    """The lab of a named source (ValueError naming the source when it is not one)."""
    if source not in LABS:
        raise ValueError(f"unknown source {source!r}; known sources: {', '.join(LABS)}")
    return LABS[source]


def same_lab(source: str) -> tuple[str, ...]:
    """Every source from ``source``'s lab, itself first (a run testing on one never trains on any)."""
    lab = lab_of(source)
    return (source, *(other for other in LABS if LABS[other] == lab and other != source))


def shared_class(name: str) -> str | None:
    """The shared class a set's class name means (case and spaces ignored), or None."""
    key = name.strip().lower()
    return key if key in SHARED_CLASSES else None


def trained_sources(config: dict) -> list[str]:
    """The named sets a run's config trained on (``dataset``, ``extra_train``, and with
    ``dataset: multi`` every source but the held-out ``test_source``)."""
    if config.get("dataset") == "multi":
        return [name for name in config.get("sources") or [] if name != config.get("test_source")]
    return [name for name in (config.get("dataset"), config.get("extra_train")) if name]


def tested_sources(config: dict) -> tuple[str, ...]:
    """Every named set whose images may be among a run's test images: the sets of the labs it
    tests on (a multi-source run without ``test_source`` tests on each of its sources)."""
    dataset = config.get("dataset")
    if dataset == "multi":
        tested = [config["test_source"]] if config.get("test_source") else config.get("sources") or []
    else:
        tested = [dataset] if dataset in LABS else []
    return tuple(other for name in tested for other in same_lab(name))


def too_few_cells(labels, min_cells: int = MIN_CLASS_CELLS) -> dict[str, int]:
    """The classes among ``labels`` (one per cell) with fewer than ``min_cells`` cells, and their
    counts, in label order: what a held-out lab's score leaves out (``MIN_CLASS_CELLS``)."""
    counts: dict[str, int] = {}
    for label in labels:
        counts[str(label)] = counts.get(str(label), 0) + 1
    return {label: n for label, n in sorted(counts.items()) if n < min_cells}
