"""Data audit: what a data set really holds before anything is trained on it.

``bloodcell audit PATH [--dataset NAME] [--json]`` loads the set with the
same loader training uses, then decodes every file in full (loading only checks headers),
and reports counts per class and split, image sizes, unreadable files, byte-identical
duplicates (flagging those filed under different classes), leakage groups that straddle
official splits, and every dropped row with its reason.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from bloodcell_lib.data.catalog import DATASETS, Manifest
from bloodcell_lib.data.datasets import detect, load_manifest
from bloodcell_lib.data.images import probe_image
from bloodcell_lib.data.sources import MIN_CLASS_CELLS, too_few_cells
from bloodcell_lib.core.paths import DataNotFoundError

NO_SPLIT = "(no split)"


def _files_to_check(manifest: Manifest) -> list[str]:
    """Every distinct file the loader looked at: table rows plus dropped items that are files.

    Dropped files count too: an ambiguous duplicate is still a readable image, and a
    .DS_Store file is still an unreadable one.
    """
    dropped = [item for item in manifest.dropped["item"] if Path(item).is_file()]
    return sorted(set(manifest.table["path"]) | set(dropped))


def audit_manifest(manifest: Manifest) -> dict:
    """JSON-ready report of one manifest; decodes every image once, fully."""
    table = manifest.table
    sizes: Counter = Counter()
    unreadable = []
    files = _files_to_check(manifest)
    for path in tqdm(files, desc=f"decoding {manifest.name}", disable=None):
        size, reason = probe_image(path, full=True)
        if reason is None:
            sizes[f"{size[0]}x{size[1]}"] += 1
        else:
            unreadable.append({"path": path, "reason": reason})
    counts = pd.crosstab(table["label"], table["split"].replace("", NO_SPLIT))
    splits_per_group = table.groupby("group")["split"].nunique()
    straddling = table[table["group"].isin(splits_per_group.index[splits_per_group > 1])]
    return {
        "dataset": manifest.name,
        "root": str(manifest.root),
        "classes": list(manifest.classes),
        "rows": len(table),
        "counts": {split: {label: int(n) for label, n in column.items()} for split, column in counts.items()},
        "files_checked": len(files),
        "readable_images": sum(sizes.values()),
        "image_sizes": dict(sizes.most_common()),
        "unreadable": unreadable,
        "duplicate_groups": manifest.duplicates,
        "groups_across_splits": [
            {"group": group, "paths": sorted(set(rows["path"])), "splits": sorted(set(rows["split"]))}
            for group, rows in straddling.groupby("group")],
        # a class this small may train only when split (splits.placement_entries) and, in a held-out
        # lab, is left out of the leave-one-lab-out scores
        "small_classes": too_few_cells(table["label"], MIN_CLASS_CELLS),
        "dropped_by_kind": {kind: int(n) for kind, n in manifest.dropped["kind"].value_counts().items()},
        "dropped": manifest.dropped.to_dict("records"),
        "notes": list(manifest.notes),
    }


def audit_path(path: str | os.PathLike, dataset: str | None = None) -> dict:
    """Audit the data set at ``path``; ``dataset`` is detected from the layout when None.

    A CSV file is audited as ``csv``, a folder holding none of the known layouts as a
    folder-per-class tree (``folder``).
    """
    path = Path(path).expanduser()
    if dataset is None:
        found = detect(path)
        if len(found) > 1:
            raise ValueError(f"{path} holds several data sets ({', '.join(found)}); choose one with --dataset")
        dataset = found[0] if found else ("csv" if path.suffix.lower() == ".csv" else "folder")
    return audit_manifest(load_manifest(dataset, path))


def _section(title: str, lines: list[str], limit: int = 20) -> list[str]:
    shown = [f"  {line}" for line in lines[:limit]]
    if len(lines) > limit:
        shown.append(f"  ... {len(lines) - limit} more (see --json)")
    return [f"\n{title} ({len(lines)})", *shown]


def format_report(report: dict) -> str:
    """The report as plain text: a count table and one line per problem."""
    counts = pd.DataFrame(report["counts"]).fillna(0).astype(int)
    counts.loc["total"] = counts.sum()
    sizes = ", ".join(f"{size}: {n}" for size, n in report["image_sizes"].items())
    duplicates = [("ACROSS CLASSES " if entry["cross_class"] else "")
                  + " = ".join(f"{path} ({label})" for path, label in zip(entry["paths"], entry["labels"]))
                  for entry in report["duplicate_groups"]]
    straddling = [f"{', '.join(entry['paths'])} in {', '.join(entry['splits'])}"
                  for entry in report["groups_across_splits"]]
    lines = [
        f"data set  {report['dataset']}  ({report['root']})",
        f"classes   {len(report['classes'])}: {', '.join(report['classes'])}",
        f"images    {report['readable_images']} readable of {report['files_checked']} files checked; "
        f"{report['rows']} usable rows",
        f"sizes     {sizes or '-'}",
        "",
        counts.to_string(),
        *_section("unreadable files", [f"{entry['path']}: {entry['reason']}" for entry in report["unreadable"]]),
        *_section("byte-identical duplicate groups", duplicates),
        *_section("leakage groups across official splits", straddling),
        *_section(f"classes with fewer than {MIN_CLASS_CELLS} images (a split may keep them in train only; "
                  "held out, they are not scored)", [f"{label}: {n}" for label, n in report.get("small_classes", {}).items()]),
        *_section("dropped rows by kind", [f"{kind}: {n}" for kind, n in report["dropped_by_kind"].items()]),
        *_section("dropped rows", [f"{entry['item']}: {entry['reason']}" for entry in report["dropped"]]),
        *_section("notes", report["notes"]),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bloodcell audit", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="data root, data set folder, or CSV file")
    parser.add_argument("--dataset", choices=DATASETS, help="data set type (detected from the layout if omitted)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    try:
        report = audit_path(args.path, args.dataset)
    except (DataNotFoundError, ValueError) as err:
        print(f"audit: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
