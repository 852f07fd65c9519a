"""reports/index.html: the targets, the comparison table with links to every notebook, the
ablation table and the key figures, rendered from a metrics document through
templates/index.html.j2 (Jinja2, autoescaped).

``bloodcell report [REPORTS_DIR]`` rebuilds metrics.json and index.html
from the records (e.g. after a newer benchmarks/results/throughput.json)."""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2

from bloodcell_lib.core.fileio import atomic_write_json, atomic_write_text
from bloodcell_lib.reporting.ablation import ablation_frame
from bloodcell_lib.reporting.comparison import comparison_table
from bloodcell_lib.reporting.document import load_metrics, metrics_document
from bloodcell_lib.reporting.records import (EXPERIMENT_NOTEBOOKS, FIGURES_DIR, INDEX_FILE, METRICS_FILE,
                                             REPORT_NOTEBOOK, left_out_note, load_records, reports_dir)
from bloodcell_lib.reporting.targets import targets_frame, targets_summary

TEMPLATES_DIR = Path(__file__).with_name("templates")
COMPARISON_COLUMNS = ["experiment", "dataset", "split", "model", "image size", "epochs", "train/val/test", "accuracy",
                      "balanced acc.", "macro-F1", "ROC-AUC", "ECE", "init", "train s", "total s", "profile"]


def _rel(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def _caption(png: Path) -> str:
    """'2-confusion-matrix.png' -> 'confusion matrix' (the number only orders the figures)."""
    return re.sub(r"^\d+-", "", png.stem).replace("-", " ")


def _figures(folder: Path, root: Path) -> list[dict[str, str]]:
    return [{"href": _rel(png, root), "caption": _caption(png)} for png in sorted(folder.glob("*.png"))]


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _frame_table(frame, row_classes: Sequence[str] | None = None,
                 cell_classes: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A DataFrame of display text as the template's table (``row_classes``: one class per row;
    ``cell_classes``: column -> class of its cells)."""
    cell_classes = cell_classes or {}
    rows = [{"cls": row_classes[i] if row_classes else None,
             "cells": [{"text": _text(row[c]), "cls": cell_classes.get(c)} for c in frame.columns]}
            for i, (_, row) in enumerate(frame.iterrows())]
    return {"columns": list(frame.columns), "rows": rows}


def _notebook_links(root: Path, name: str) -> list[dict[str, str | None]]:
    """Each of the experiment's notebook pages that exists, with its .ipynb when that exists."""
    links = []
    for notebook in EXPERIMENT_NOTEBOOKS:
        page, ipynb = root / name / f"{notebook}.html", root / name / f"{notebook}.ipynb"
        if page.exists():
            links.append({"text": notebook, "href": _rel(page, root),
                          "ipynb": _rel(ipynb, root) if ipynb.exists() else None})
    return links


def _comparison(root: Path, document: Mapping[str, Any]) -> dict[str, Any]:
    """Experiments (with their notebook links; those the build left out say why and where their
    numbers come from) and reference rows (with their source)."""
    records = document.get("experiments", [])
    by_name = {r["name"]: r for r in records}
    rows = []
    for _, row in comparison_table(records).iterrows():
        cells = [{"text": _text(row.get(c, ""))} for c in COMPARISON_COLUMNS]
        if row["row"] == "reference":
            cells.append({"text": _text(row.get("source", ""))})
        else:
            if row["row"] == "ablation":
                cells[0]["ablation_of"] = _text(row["ablation of"])
            name = str(row["experiment"])
            cells[0]["left_out"] = left_out_note(document, name, by_name.get(name))
            cells.append({"links": _notebook_links(root, str(row["experiment"]))})
        rows.append({"cls": row["row"], "cells": cells})
    return {"columns": COMPARISON_COLUMNS + ["notebooks"], "rows": rows}


BUILD_COLUMNS = ["experiment", "notebook", "status", "why", "seconds (this build)", "seconds when it ran"]


def _seconds(value: Any) -> str:
    return "" if value is None else f"{float(value):.1f}"


def _build_table(document: Mapping[str, Any]) -> dict[str, Any] | None:
    """metrics.json's ``build.notebooks`` (run_all.sh: what reran and why, seconds per
    experiment and notebook), a total row after each experiment's notebooks; None before any."""
    rows = (document.get("build") or {}).get("notebooks") or []
    if not rows:
        return None
    out = []
    for experiment in dict.fromkeys(r["experiment"] for r in rows):
        mine = [r for r in rows if r["experiment"] == experiment]
        for r in mine:
            out.append({"cls": r.get("status"), "cells": [{"text": _text(v)} for v in (
                experiment, r.get("notebook"), r.get("status"), r.get("reason"),
                _seconds(r.get("seconds")), _seconds(r.get("run_seconds")))]})
        if len(mine) > 1:
            out.append({"cls": "total", "cells": [{"text": t} for t in (
                experiment, "total", "", "", _seconds(sum(r.get("seconds") or 0 for r in mine)),
                _seconds(sum(r.get("run_seconds") or 0 for r in mine)))]})
    return {"columns": BUILD_COLUMNS, "rows": out}


def _page_links(root: Path) -> list[dict[str, str]]:
    pages = [(root / f"{REPORT_NOTEBOOK}.html", "Comparison report (04_report)"), (root / METRICS_FILE, "metrics.json")]
    return [{"href": _rel(path, root), "text": text} for path, text in pages if path.exists()]


def render_index(root: str | os.PathLike, document: Mapping[str, Any]) -> str:
    """reports/index.html from a metrics document: the targets (met or not, beside the
    published numbers), the comparison table with links to every notebook (HTML and .ipynb),
    the ablation table, the report, metrics.json and the key figures of each experiment."""
    root = Path(root)
    records = document.get("experiments", [])
    by_name = {r["name"]: r for r in records}
    targets, git = document["targets"], document.get("git") or {}
    # Cells leave out what they lack (ablation_of, links): the default Undefined renders empty.
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES_DIR), autoescape=True)
    return environment.get_template("index.html.j2").render(
        generated=document.get("generated", _dt.datetime.now().isoformat(timespec="seconds")),
        build_minutes=document["build_seconds"] / 60 if document.get("build_seconds") is not None else None,
        profile=document.get("profile"), commit=(git.get("commit") or "")[:12], dirty=git.get("dirty"),
        smoke=document.get("profile") == "smoke" or any(r.get("profile") == "smoke" for r in records),
        init_warnings=[(r["name"], r["init_note"]) for r in records if r.get("init_note") and r.get("pretrained_requested")],
        page_links=_page_links(root),
        targets_summary=targets_summary(targets),
        targets=_frame_table(targets_frame(targets),
                             ["met" if t["met"] else "not-met" if t["met"] is False else "open" for t in targets],
                             {"status": "status"}),
        comparison=_comparison(root, document),
        left_out=[(name, left_out_note(document, name, by_name.get(name))) for name in document.get("left_out") or {}],
        ablation=_frame_table(ablation_frame(document["ablation"])),
        build=_build_table(document),
        summary_figures=_figures(root / FIGURES_DIR, root),
        experiment_cards=[{"name": r["name"], "title": _text(r.get("title") or ""),
                           "figures": _figures(root / r["name"] / FIGURES_DIR, root)} for r in records])


def write_index(root: str | os.PathLike, document: Mapping[str, Any]) -> Path:
    return atomic_write_text(Path(root) / INDEX_FILE, render_index(root, document))


def rebuild(root: Path) -> Path:
    """metrics.json and index.html of a reports folder, recomputed from its records. Keeps what
    only the build knew (profile, git, build_seconds, ...)."""
    previous = load_metrics(root)
    derived = {"format", "version", "generated", "experiments", "references", "targets", "ablation"}
    document = metrics_document(load_records(root), **{k: v for k, v in previous.items() if k not in derived})
    atomic_write_json(root / METRICS_FILE, document)
    return write_index(root, document)


def main(argv: Sequence[str]) -> int:
    """``bloodcell report [REPORTS_DIR]``: rebuild metrics.json and index.html from the records."""
    parser = argparse.ArgumentParser(prog="bloodcell report",
                                     description="Rebuild metrics.json and index.html from the experiments' records.")
    parser.add_argument("reports_dir", nargs="?", type=Path, default=None,
                        help="the reports folder (default: $BLOODCELL_REPORTS or reports/)")
    print(rebuild(parser.parse_args(list(argv)).reports_dir or reports_dir()))
    return 0
