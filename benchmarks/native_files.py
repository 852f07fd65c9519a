"""The shipped `pbc` model on the analyser's own files, as a new user runs it (issue 25).

    .venv/bin/python benchmarks/native_files.py [--run runs/pbc] [--native ../shared/data/pbc-native]
        [--out benchmarks/results/native_files.json]

Runs ``bloodcell predict`` (default settings, the README's command) once on the native
360x363 exports of ``pbc-native`` and once on the same cells' 200x200 crops under ``pbc/``,
each in a scratch folder, and scores both on the cells in the run's *test* split only
(``robustness.native_cells``: never a cell the run trained, validated or calibrated on).
Prints accuracy, the accepted share (cells not flagged for review) and the accuracy of the
accepted cells, and writes them as JSON. A measurement, not a test: it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bloodcell_lib.core.fileio import atomic_write_json  # noqa: E402
from bloodcell_lib.data.splits import load_split  # noqa: E402
from bloodcell_lib.evaluation.robustness import native_cells  # noqa: E402


def predict_scores(checkpoint: Path, files: list[str], labels: list[str], scratch: Path, name: str) -> dict:
    """``bloodcell predict`` on ``files`` (listed on the command line, as a user would pass a
    folder's pictures) and the scores of its CSV against ``labels``."""
    out = scratch / f"{name}.csv"
    subprocess.run([sys.executable, "-m", "bloodcell_lib", "predict", "--checkpoint", str(checkpoint),
                    "--out", str(out), *files], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    predicted = pd.read_csv(out).set_index("path")
    frame = pd.DataFrame({"label": labels}, index=[str(f) for f in files])  # predict writes paths as given
    frame = frame.join(predicted[["predicted", "needs_review"]], how="left")
    right = frame["predicted"].str.lower() == frame["label"].str.lower()
    accepted = ~frame["needs_review"].astype(bool)
    return {"cells": len(frame), "unscored": int(frame["predicted"].isna().sum()), "accuracy": float(right.mean()),
            "accepted": int(accepted.sum()), "accepted_share": float(accepted.mean()),
            "accuracy_accepted": float(right[accepted].mean()) if accepted.any() else None}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(ROOT / "runs" / "pbc"), help="the run folder (checkpoint and split.csv)")
    parser.add_argument("--native", default=str(ROOT.parent / "shared" / "data" / "pbc-native" / "PBC_native_360x363"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "native_files.json"))
    args = parser.parse_args(argv)
    run = Path(args.run)
    cells, excluded = native_cells(load_split(run / "split.csv"), args.native)
    result = {"checkpoint": str(run / "checkpoint_best.pt"), "native_folder": args.native,
              "excluded": excluded}
    with tempfile.TemporaryDirectory() as scratch:
        for name, column in (("native export", "native"), ("prepared crop", "path")):
            result[name] = predict_scores(run / "checkpoint_best.pt", cells[column].tolist(),
                                          cells["label"].tolist(), Path(scratch), name.replace(" ", "_"))
    for name in ("native export", "prepared crop"):
        r = result[name]
        right = "-" if r["accuracy_accepted"] is None else f"{r['accuracy_accepted']:.4f}"
        print(f"{name:14s} {r['cells']} cells: accuracy {r['accuracy']:.4f}; accepted {r['accepted']} "
              f"({r['accepted_share']:.1%}) at {right}")
    print(f"left out: {json.dumps(excluded)}")
    atomic_write_json(Path(args.out), result)
    return result


if __name__ == "__main__":
    main()
