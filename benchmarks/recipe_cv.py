"""Compare training recipes by cross-validation inside an experiment's official TRAIN split.

    .venv/bin/python benchmarks/recipe_cv.py experiments/kaggle.yaml [--folds 5]
        [--train-per-class 700] [--members 1] [--set key=value ...] [--out benchmarks/results/recipe_cv.json]

Kaggle's official TEST must be scored once, at the end, and the validation part the
experiment carves from TRAIN holds 27 cells: too few to rank two recipes. This script splits
the TRAIN cells into ``--folds`` stratified folds, whole cells (leakage groups) only, trains
the recipe on all folds but one (at most ``--train-per-class`` pictures per class, drawn
with seed + fold, so a fold trains in minutes) and scores the held-out fold, for every fold.
Each run's split file marks the held-out fold ``val`` and the official TEST ``test``;
``train.fit`` never reads test rows. The last epoch is scored (monitor: none, no early
stopping), so the held-out fold chooses nothing. ``--members N`` trains N models per fold
(training seeds seed..seed+N-1, each on its own draw of training pictures) and scores the
average of their probabilities: an ensemble, beside each member's own score.

Prints one row per fold and the mean, and writes JSON. A recipe difference means something
only when it is consistent across the folds: the script reports no significance.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/recipe_cv.py` without an installed package
    sys.path.insert(0, str(ROOT))

from bloodcell_lib.training import train as T  # noqa: E402  (first: sets the thread policy before torch loads)
from bloodcell_lib.data import catalog, selection, splits  # noqa: E402
from bloodcell_lib.training.cli import parse_set  # noqa: E402
from bloodcell_lib.evaluation import evaluate
from bloodcell_lib.training.config import make_config, read_params  # noqa: E402
from bloodcell_lib.core.fileio import atomic_write_json  # noqa: E402
from bloodcell_lib.evaluation.metrics import compute_metrics  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "recipe_cv.json"
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "log_loss")


def fold_split_tables(manifest: catalog.Manifest, folds: int, train_per_class: int, seed: int,
                      draw: int = 0) -> list:
    """One split table per fold over every manifest row: the held-out TRAIN cells ``val``, the
    other TRAIN cells ``train`` (at most ``train_per_class`` per class, drawn with seed + fold
    + 1000 x ``draw``: the folds stay the same for every draw),
    the rest as they were (official test rows; extra_train rows, already ``train``), and the
    TRAIN pictures left out of the draw ``unused``."""
    table = manifest.table
    own_train = (table["source"] == manifest.name) & (table["split"] == "train")
    if not own_train.any():
        raise ValueError(f"data set '{manifest.name}' has no official TRAIN / TEST split; use the experiment's "
                         "own cv_folds instead")
    tables = []
    for index, fold in enumerate(splits.kfold_splits(table[own_train].assign(split=""), folds, val_fraction=0.0,
                                                     seed=seed)):
        fold["split"] = fold["split"].replace({"test": "val"})
        kept = fold[fold["split"] == "train"].sample(frac=1.0, random_state=seed + index + 1000 * draw)
        if train_per_class:
            kept = kept.groupby("label", sort=False).head(train_per_class)
        fold.loc[(fold["split"] == "train") & ~fold["path"].isin(kept["path"]), "split"] = "unused"
        out = table.copy()
        out.loc[own_train, "split"] = out.loc[own_train, "path"].map(dict(zip(fold["path"], fold["split"])))
        tables.append(out)
    return tables


def train_member(params: dict[str, Any], table, name: str, seed: int, work_dir: Path) -> dict[str, Any]:
    """Train the recipe once on a split table; its held-out (val) results, without and with flips."""
    split_file = splits.save_split(table, work_dir / f"split_{name}.csv")
    cfg = make_config({**params, "name": name, "seed": seed, "output_dir": str(work_dir),
                       "split_file": str(split_file), "cv_folds": 0, "monitor": "none",
                       "early_stopping_patience": 0, "resume": False})
    T.fit(cfg, progress=False)
    plain, tta = evaluate.evaluate_plain_and_tta(cfg.run_dir, split="val", checkpoint="checkpoint_last.pt",
                                                 write=False)
    return {"plain": plain, "tta": tta}


def score(members: list, groups: dict[str, str]) -> dict[str, Any]:
    """Metrics of the members' averaged probabilities (one member: its own), and how many
    held-out cells most of their pictures got right."""
    first = members[0]
    if any(not m.predictions["path"].equals(first.predictions["path"]) for m in members[1:]):
        raise RuntimeError("ensemble members scored different pictures; their probabilities cannot be averaged")
    proba = np.mean([m.proba for m in members], axis=0)
    labels = first.predictions["label"].astype(str).tolist()
    metrics = compute_metrics(labels, proba, first.class_names)
    right = pd.Series(np.array(first.class_names)[proba.argmax(1)] == np.array(labels))
    cells = right.groupby(first.predictions["path"].map(groups).to_numpy()).mean()
    return {**{name: metrics[name] for name in METRICS}, "cells": int(len(cells)), "cells_right": int((cells > 0.5).sum())}


def run_fold(params: dict[str, Any], member_tables: list, fold: int, seed: int, work_dir: Path) -> dict[str, Any]:
    """Train the recipe on one fold's split, once per member table (training seed seed + member),
    and score its held-out cells (last epoch), the members' probabilities averaged."""
    several = len(member_tables) > 1
    results = [train_member(params, table, f"fold_{fold}" + (f"_member_{member}" if several else ""),
                            seed + member, work_dir) for member, table in enumerate(member_tables)]
    table = member_tables[0]
    groups = dict(zip(table["path"], table["group"]))
    row: dict[str, Any] = {"fold": fold, "train_images": int((table["split"] == "train").sum())}
    for tag in ("plain", "tta"):
        row[tag] = score([result[tag] for result in results], groups)
        if several:
            row[tag]["members_accuracy"] = [result[tag].metrics["accuracy"] for result in results]
    return row


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for tag in ("plain", "tta"):
        out[tag] = {name: {"mean": float(np.mean([r[tag][name] for r in rows])),
                           "sd": float(np.std([r[tag][name] for r in rows], ddof=1)) if len(rows) > 1 else None}
                    for name in METRICS}
        out[tag]["cells_right"] = int(sum(r[tag]["cells_right"] for r in rows))
        out[tag]["cells"] = int(sum(r[tag]["cells"] for r in rows))
        if "members_accuracy" in rows[0][tag]:
            out[tag]["members_accuracy_mean"] = float(np.mean([r[tag]["members_accuracy"] for r in rows]))
    return out


def format_table(result: dict[str, Any]) -> str:
    lines = ["| fold | train images | accuracy | with flips | macro-F1 (flips) | log loss (flips) | cells right (flips) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["folds"]:
        lines.append(f"| {r['fold']} | {r['train_images']} | {r['plain']['accuracy']:.4f} | {r['tta']['accuracy']:.4f} | "
                     f"{r['tta']['macro_f1']:.4f} | {r['tta']['log_loss']:.4f} | {r['tta']['cells_right']}/{r['tta']['cells']} |")
    s = result["summary"]
    lines.append(f"| mean | | {s['plain']['accuracy']['mean']:.4f} | {s['tta']['accuracy']['mean']:.4f} "
                 f"(sd {s['tta']['accuracy']['sd'] or 0:.4f}) | {s['tta']['macro_f1']['mean']:.4f} | "
                 f"{s['tta']['log_loss']['mean']:.4f} | {s['tta']['cells_right']}/{s['tta']['cells']} |")
    if "members_accuracy_mean" in s["tta"]:
        lines.append(f"\nEnsemble of {result['members']} per fold (probabilities averaged); its members alone: "
                     f"accuracy {s['plain']['members_accuracy_mean']:.4f}, with flips {s['tta']['members_accuracy_mean']:.4f} "
                     "(mean over folds and members).")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="experiment YAML (e.g. experiments/kaggle.yaml)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--train-per-class", type=int, default=700,
                        help="training pictures per class and fold, drawn with the seed (0: all; default 700)")
    parser.add_argument("--members", type=int, default=1,
                        help="models per fold, each on its own training draw and seed; their probabilities averaged")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe parameter (YAML literal), e.g. --set extra_train=pbc")
    parser.add_argument("--work-dir", default=None, help="where the fold runs go (default: a temporary folder)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON result file")
    args = parser.parse_args(argv)
    if args.members < 1:
        parser.error(f"--members must be >= 1 (got {args.members})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = {**read_params(args.config), **parse_set(args.set)}
    cfg = make_config(params)
    manifest = selection.load_manifest_for(cfg)
    draws = [fold_split_tables(manifest, args.folds, args.train_per_class, cfg.seed, draw)
             for draw in range(args.members)]
    with tempfile.TemporaryDirectory(prefix="bloodcell-recipe-cv-") as tmp:
        work_dir = Path(args.work_dir or tmp)
        rows = []
        for fold, member_tables in enumerate(zip(*draws)):
            rows.append(run_fold(params, list(member_tables), fold, cfg.seed, work_dir))
            T.log(f"fold {fold}: accuracy {rows[-1]['plain']['accuracy']:.4f}, with flips {rows[-1]['tta']['accuracy']:.4f}")
    result = {"written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "config": args.config,
              "overrides": args.set, "folds": rows, "train_per_class": args.train_per_class, "members": args.members,
              "summary": summary(rows)}
    atomic_write_json(args.out, result)
    print(format_table(result))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
