"""Few-shot adaptation to a lab, files in and files out: the ``adapt`` command and the few-shot study.

Command line::

    bloodcell adapt --checkpoint runs/pbc/checkpoint_best.pt (--folder LAB/ | --labels labels.csv) \\
        [--unlabelled LAB_UNLABELLED/] --out lab.pt [--k 10] [--seed 0] [--epochs 12] [--lr 1e-3]
        [--unfreeze-last 2] [--no-bn]

``LAB/`` holds one folder per class (the ``folder`` loader of ``data.datasets``); folder
names must be classes of the checkpoint. ``labels.csv`` is a labels file as the review page
saves it (``evaluation.labels``: every row not used is reported with its row number).
``--unlabelled`` first re-estimates the BatchNorm statistics on a folder of the lab's
unlabelled cells (AdaBN, ``adapt_bn``), then fine-tunes. With 20 or more labelled cells the
temperature, review thresholds and k-NN feature bank are refitted for the lab by
cross-fitting (``lab_calibration``). The recipe and the written checkpoint are
described in ``training.adapt``. Exit codes: 0 ok, 2 bad arguments, checkpoint or folder.

``few_shot_study`` measures what k labelled cells per class buy on one held-out lab: k
cells per class are drawn (seeded, whole leakage groups), the model is adapted on them and
scored on the REST of that lab, never on its own adaptation cells.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from bloodcell_lib.data.sources import MIN_CLASS_CELLS, too_few_cells
from bloodcell_lib.evaluation.predict import predict_tensors
from bloodcell_lib.modeling.checkpoint import CheckpointError, read_checkpoint
from bloodcell_lib.modeling.loaded import LoadedModel, load_checkpoint
from bloodcell_lib.evaluation.unlabelled_adapt import ADAPTED, adapt_unlabelled
from bloodcell_lib.evaluation.unlabelled_adapt import METHODS as ADAPT_METHODS
from bloodcell_lib.training.adapt import (AdaptError, AdaptRecipe, adapted_checkpoint, draw_cells, fine_tune,
                                          label_indices_for, load_lab_cells)

FEW_SHOT_COLUMNS = ["adaptation", "k", "n_adapt", "n_scored", "accuracy", "balanced_accuracy", "macro_f1"]
# The unlabelled-adaptation rows (``unlabelled_adapt``): the model as trained, then each method
# adapted on and scored on the same cells of a draw: its scored cells, at most this many per
# class (seeded), as ``predict --adapt`` would run on a folder of them (guards included).
UNLABELLED_METHODS = ("plain", *ADAPT_METHODS)
UNLABELLED_PER_CLASS = 200
UNLABELLED_COLUMNS = ["method", "n_cells", "adapted_draws", "accuracy", "balanced_accuracy", "macro_f1", "seconds"]
# What each row of the study did to the model before scoring the lab's cells.
AS_TRAINED, UNLABELLED_BN, FINE_TUNED = "none", "BatchNorm statistics of the scored cells (no labels)", "fine-tuned"


def adapt_checkpoint(checkpoint: str | Path, folder: str | Path, out: str | Path, *, k: int | None = None,
                     recipe: AdaptRecipe | None = None, unlabelled: str | Path | None = None) -> dict[str, Any]:
    """Fine-tune ``checkpoint`` on the lab cells under ``folder`` and write the lab's checkpoint
    to ``out``; returns the ``adapted_from`` record (parent, k, cells, recipe, notes, history)."""
    recipe = (recipe or AdaptRecipe()).check()
    loaded = load_checkpoint(checkpoint)
    table, images, notes = load_lab_cells(folder, loaded, k=k, seed=recipe.seed)
    labels = label_indices_for(table["label"], loaded.class_names, f"--folder {folder}")
    record = {"folder": str(Path(folder).resolve()), "k_per_class": k}
    return _fine_tune_and_write(checkpoint, loaded, table, images, labels, recipe, out, notes, record,
                                unlabelled)


def adapt_from_labels(checkpoint: str | Path, labels_csv: str | Path, out: str | Path, *,
                      recipe: AdaptRecipe | None = None, unlabelled: str | Path | None = None) -> dict[str, Any]:
    """Fine-tune ``checkpoint`` on the cells of a labels file (``evaluation.labels``: as the
    review page saves it, or by hand) and write the lab's checkpoint to ``out``; every row not
    used is in the record's notes with its row number and reason."""
    from bloodcell_lib.evaluation.labels import read_labels

    recipe = (recipe or AdaptRecipe()).check()
    loaded = load_checkpoint(checkpoint)
    cells = read_labels(labels_csv, loaded)
    if len(cells.table) < 2:
        raise AdaptError("\n".join([f"--labels {labels_csv}: need at least 2 usable labelled cells, found "
                                    f"{len(cells.table)}", *cells.notes()]))
    labels = label_indices_for(cells.table["label"], loaded.class_names, f"--labels {labels_csv}")
    record = {"labels": str(Path(labels_csv).resolve()), "rows_used": cells.table["row"].tolist(),
              "rows_not_used": [{"row": row, "reason": reason} for row, reason in cells.problems],
              "rows_unsure": cells.unsure}
    return _fine_tune_and_write(checkpoint, loaded, cells.table, cells.images, labels, recipe, out,
                                cells.notes(), record, unlabelled)


def _fine_tune_and_write(checkpoint, loaded, table, images, labels, recipe, out, notes, record,
                         unlabelled) -> dict[str, Any]:
    """AdaBN on ``unlabelled`` (when given), fine-tuning with the lab's review entries refitted
    (``lab_calibration.refit_for_lab``), and the checkpoint written to ``out``."""
    from bloodcell_lib.core.fileio import atomic_torch_save, sha256_file
    from bloodcell_lib.evaluation.adapt_bn import adapt_to_folder
    from bloodcell_lib.evaluation.lab_calibration import refit_for_lab

    missing = [name for name in loaded.class_names if name not in set(table["label"])]
    if missing:
        notes.append(f"no cells of {', '.join(missing)} among the labelled cells: the parent model's knowledge "
                     "of them is kept")
    if unlabelled is not None:
        try:
            done = adapt_to_folder(loaded, unlabelled)
        except ValueError as err:
            raise AdaptError(str(err).replace("--adapt", "--unlabelled")) from err
        notes += done.summary().replace("adaptation skipped", "--unlabelled: skipped").splitlines()
        recipe = replace(recipe, adapt_bn=False)  # keep the statistics of the lab's (larger) unlabelled set
    entries, review_notes, history = refit_for_lab(loaded, images, labels, recipe)
    notes += review_notes
    record = {"parent": str(Path(checkpoint).resolve()), "parent_sha256": sha256_file(checkpoint), **record,
              "unlabelled": None if unlabelled is None else str(Path(unlabelled).resolve()),
              "n_cells": len(table),
              "cells_per_class": {str(c): int(n) for c, n in table["label"].value_counts().sort_index().items()},
              "cells": table["path"].tolist(), "recipe": asdict(recipe), "notes": notes, "history": history}
    ckpt = adapted_checkpoint(read_checkpoint(checkpoint), loaded.model, record)
    atomic_torch_save({**ckpt, **(entries or {})}, out)
    return record


# --------------------------------------------------------------------------- few-shot study

def lab_scores(labels: np.ndarray, proba: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """accuracy, balanced_accuracy and macro_f1 over the classes the lab has (a prediction of a
    class the lab lacks counts as an error; that class's own F1 is not averaged in)."""
    from bloodcell_lib.evaluation.metrics import compute_metrics

    metrics = compute_metrics(labels, proba, class_names)
    f1 = [entry["f1"] for entry in metrics["per_class"].values() if entry["support"]]
    return {"accuracy": float(metrics["accuracy"]), "balanced_accuracy": float(metrics["balanced_accuracy"]),
            "macro_f1": float(np.mean(f1))}


def _check_never_scored(table: pd.DataFrame, adapt_rows: np.ndarray, scored_rows: np.ndarray) -> None:
    """The adaptation cells and the scored cells share no file and no leakage group."""
    for column in ("path", "group"):
        if column in table:
            shared = set(table[column].iloc[adapt_rows]) & set(table[column].iloc[scored_rows])
            if shared:
                raise AssertionError(f"few-shot study: {len(shared)} {column}(s) both adapted on and scored, "
                                     f"e.g. {sorted(shared)[0]}")


def _lab_images(table: pd.DataFrame, loaded: LoadedModel) -> tuple[pd.DataFrame, torch.Tensor, list]:
    """The lab's readable rows and their uint8 images at the checkpoint's size (from the cache)."""
    from bloodcell_lib.data.cache import load_or_build_cache

    cached = load_or_build_cache(table, loaded.image_size, num_workers=0, progress=False)
    ok = cached.ok.numpy()
    return table[ok].reset_index(drop=True), cached.images[torch.from_numpy(ok)], list(cached.failed)


def _unlabelled_rows(loaded, parent_state, images, labels, scored, seed, methods, per_class
                     ) -> list[dict[str, Any]]:
    """One row per method of ``methods`` (``plain``: the model as trained): adapted on at most
    ``per_class`` of the ``scored`` cells per class (seeded; the labels choose the cells, the
    methods never see them) and scored on the same cells (transductive, as ``predict --adapt``
    on the folder it classifies): balanced accuracy and each class's recall."""
    y = labels.numpy()
    rng = np.random.default_rng(seed)
    cells = np.sort(np.concatenate([rng.permutation(scored[y[scored] == c])[:per_class]
                                    for c in np.unique(y[scored])]))
    rows = []
    for method in methods:
        loaded.model.load_state_dict(parent_state)
        done = None if method == "plain" else adapt_unlabelled(loaded, images[cells], method,
                                                                  source="the scored cells")
        proba = predict_tensors(loaded, images[cells])
        predicted = proba.argmax(1)
        recall = {f"recall_{loaded.class_names[c]}": float(np.mean(predicted[y[cells] == c] == c))
                  for c in np.unique(y[cells])}
        rows.append({"method": method, "n_cells": len(cells), "seed": seed,
                     "adapted_draws": int(done is not None and done.kept == ADAPTED),
                     "seconds": 0.0 if done is None else done.seconds,
                     **lab_scores(y[cells], proba, loaded.class_names), **recall})
    loaded.model.load_state_dict(parent_state)
    return rows


def _one_draw(loaded, parent_state, table, images, labels, k_values, recipe,
              unlabelled=(UNLABELLED_METHODS, UNLABELLED_PER_CLASS)) -> tuple[list[dict[str, Any]], list]:
    """Rows of one draw: every k scored on the same cells (the lab minus the largest k's
    cells), and at k = 0 also the model with its BatchNorm statistics re-estimated on those
    unlabelled cells (what ``predict --adapt`` does with a folder of the lab's cells); and the
    unlabelled-adaptation rows (``_unlabelled_rows``) of the same draw."""
    from bloodcell_lib.modeling.adaptation import adapt_batchnorm

    largest = draw_cells(table, max(k_values), recipe.seed)
    scored = np.setdiff1d(np.arange(len(table)), largest)
    if len(scored) == 0:
        raise AdaptError(f"few-shot study: k = {max(k_values)} takes every cell of the lab; nothing left to score")
    rows = []

    def score(adaptation: str, k: int, n_adapt: int) -> None:
        proba = predict_tensors(loaded, images[scored])
        rows.append({"adaptation": adaptation, "k": int(k), "n_adapt": n_adapt, "n_scored": len(scored),
                     "seed": recipe.seed, **lab_scores(labels[scored].numpy(), proba, loaded.class_names)})

    for k in k_values:
        adapt_rows = draw_cells(table, k, recipe.seed) if k else np.zeros(0, dtype=int)
        _check_never_scored(table, adapt_rows, scored)
        loaded.model.load_state_dict(parent_state)
        if k:
            fine_tune(loaded, images[adapt_rows], labels[adapt_rows], recipe)
            score(FINE_TUNED, k, len(adapt_rows))
            continue
        score(AS_TRAINED, 0, 0)
        if len(scored) >= 2:
            adapt_batchnorm(loaded, images[scored])
            score(UNLABELLED_BN, 0, 0)
    loaded.model.load_state_dict(parent_state)
    methods, per_class = unlabelled
    return rows, (_unlabelled_rows(loaded, parent_state, images, labels, scored, recipe.seed, methods, per_class)
                  if methods else [])


def few_shot_study(checkpoint: str | Path, table: pd.DataFrame, k_values: Sequence[int] = (0, 5, 10),
                   seed: int = 0, *, draws: int = 1, recipe: AdaptRecipe | None = None,
                   device: str = "cpu", unlabelled_methods: Sequence[str] = UNLABELLED_METHODS,
                   unlabelled_per_class: int = UNLABELLED_PER_CLASS) -> dict[str, Any]:
    """Adapt ``checkpoint`` on k labelled cells per class of one held-out lab (``table``: a
    Manifest table, columns path, label, group, box) and score it on the rest of that lab.

    Draw d (of ``draws``) uses seed ``seed + d``; k = 0 is the parent model as it is, and the
    parent with BatchNorm statistics re-estimated on the scored cells (unlabelled). Returns
    the ``few_shot`` record of metrics.json: checkpoint, lab, seed, draws, k_values, recipe,
    n_cells, skipped, per_draw (one row per draw, adaptation and k) and rows (mean over draws
    per adaptation and k: adaptation, k, n_adapt, n_scored (means rounded to whole cells),
    accuracy, balanced_accuracy, macro_f1, draws), and ``unlabelled``: the rows of
    ``unlabelled_methods`` (``_unlabelled_rows``; none when empty) with the lab's class mix.
    """
    ks = [int(k) for k in k_values]
    if not ks or any(k < 0 for k in ks) or draws < 1:
        raise AdaptError(f"k_values must be integers >= 0 and draws >= 1; got k_values={list(k_values)}, draws={draws}")
    recipe = (recipe or AdaptRecipe()).check()
    loaded = load_checkpoint(checkpoint, device)
    parent_state = {name: value.clone() for name, value in loaded.model.state_dict().items()}
    table, images, failed = _lab_images(table, loaded)
    labels = label_indices_for(table["label"], loaded.class_names, "few_shot_study")
    per_draw, unlabelled = [], []
    for d in range(draws):
        rows, extra = _one_draw(loaded, parent_state, table, images, labels, ks, replace(recipe, seed=seed + d),
                                (tuple(unlabelled_methods), unlabelled_per_class))
        per_draw += rows
        unlabelled += extra
    frame = pd.DataFrame(per_draw)
    means = frame.groupby(["adaptation", "k"], sort=False)[FEW_SHOT_COLUMNS[2:]].mean().reset_index()
    counts = ("k", "n_adapt", "n_scored")  # whole cells: a mean over draws is rounded
    rows = [{"adaptation": row["adaptation"],
             **{key: (int(round(row[key])) if key in counts else float(row[key])) for key in FEW_SHOT_COLUMNS[1:]},
             "draws": draws} for row in means.to_dict("records")]
    sources = sorted(set(table["source"])) if "source" in table else []
    return {"checkpoint": str(checkpoint), "lab": ", ".join(sources), "seed": seed, "draws": draws,
            "k_values": ks, "recipe": asdict(recipe), "n_cells": len(table),
            "skipped": [{"path": path, "reason": reason} for path, reason in failed],
            "per_draw": per_draw, "rows": rows,
            "unlabelled": _unlabelled_record(unlabelled, table, draws, unlabelled_per_class)}


def _unlabelled_record(per_draw: list[dict[str, Any]], table: pd.DataFrame, draws: int,
                       per_class: int) -> dict[str, Any]:
    """The record's ``unlabelled`` entry: the lab's class mix (cells, share), the cap, the rows of
    every draw and their means per method over draws (``adapted_draws``: in how many draws the
    method's adapted model was kept, the guards not tripping; ``n_cells`` rounded)."""
    mix = table["label"].value_counts().sort_index()
    frame = pd.DataFrame(per_draw)
    rows = []
    if len(frame):
        means = frame.drop(columns=["seed", "adapted_draws"]).groupby("method", sort=False).mean()
        for method, row in means.iterrows():
            rows.append({"method": method, **row.to_dict(), "n_cells": int(round(row["n_cells"])), "draws": draws,
                         "adapted_draws": int(frame.loc[frame["method"] == method, "adapted_draws"].sum())})
    return {"per_class_cap": per_class, "class_mix": {str(c): int(n) for c, n in mix.items()},
            "class_share": {str(c): float(n / mix.sum()) for c, n in mix.items()}, "per_draw": per_draw,
            "rows": rows}


def held_out_lab_study(cfg: Any, k_values: Sequence[int] = (0, 5, 10), *, draws: int = 2,
                       device: str = "cpu", min_class_cells: int = MIN_CLASS_CELLS) -> dict[str, Any] | None:
    """``few_shot_study`` of a leave-one-lab-out run (``cfg.test_source`` set) on its held-out lab:
    the test rows of its split.csv, adapted from its kept checkpoint. None for any other run.
    Two draws by default: one draw of a few hundred cells moves by about 0.03. A class the lab
    has fewer than ``min_class_cells`` cells of (KRD-WBC's one basophil) is neither drawn nor
    scored: the record names it (``classes_left_out``) beside the rule (``min_class_cells``)."""
    from bloodcell_lib.data.splits import load_split
    from bloodcell_lib.modeling.rundir import KEPT_CHECKPOINT

    if not getattr(cfg, "test_source", None):
        return None
    run_dir = Path(cfg.run_dir)
    table = load_split(run_dir / "split.csv")
    held_out = table[table["split"] == "test"].reset_index(drop=True)
    left_out = too_few_cells(held_out["label"], min_class_cells)
    held_out = held_out[~held_out["label"].isin(left_out)].reset_index(drop=True)
    record = few_shot_study(run_dir / KEPT_CHECKPOINT, held_out, k_values, seed=cfg.seed, draws=draws, device=device)
    return {**record, "min_class_cells": min_class_cells, "classes_left_out": left_out}


def few_shot_fields(record: dict[str, Any]) -> dict[str, Any]:
    """The experiment-record entries of a few-shot record: the record itself, one scalar per k
    (``few_shot_k<k>_balanced_accuracy``, which the targets table reads) and the unlabelled
    BatchNorm row's (``adapt_bn_balanced_accuracy``), and one per unlabelled-adaptation method
    (``unlabelled_<method>_balanced_accuracy``, ``-`` written ``_``)."""
    fields: dict[str, Any] = {"few_shot": record}
    for row in record["rows"]:
        key = "adapt_bn" if row.get("adaptation") == UNLABELLED_BN else f"few_shot_k{row['k']}"
        fields[f"{key}_balanced_accuracy"] = row["balanced_accuracy"]
    for row in (record.get("unlabelled") or {}).get("rows", []):
        fields[f"unlabelled_{row['method'].replace('-', '_')}_balanced_accuracy"] = row["balanced_accuracy"]
    return fields


def unlabelled_table(record: dict[str, Any]) -> pd.DataFrame:
    """The unlabelled-adaptation rows of a ``few_shot_study`` record (one per method: balanced
    accuracy, each class's recall), for a notebook; the lab's class mix is ``record["unlabelled"]["class_share"]``."""
    rows = (record.get("unlabelled") or {}).get("rows", [])
    recalls = sorted({key for row in rows for key in row if key.startswith("recall_")})
    return pd.DataFrame(rows, columns=[*UNLABELLED_COLUMNS, *recalls, "draws"])


def default_method_by_rule(per_lab: dict[str, dict[str, float]]) -> str:
    """The rule for ``--adapt``'s default (docs/adapting.md): of the methods measured on every
    held-out lab (``per_lab[lab][method]``: the lab's ``unlabelled_<method>`` balanced accuracy),
    the best mean balanced accuracy among those never worse than ``adabn`` on any lab; ``adabn``
    when none is better."""
    labs = list(per_lab.values())
    methods = [m for m in ADAPT_METHODS if labs and all(m in lab and "adabn" in lab for lab in labs)]
    fair = [m for m in methods if all(lab[m] >= lab["adabn"] for lab in labs)]
    return max(fair, key=lambda m: (np.mean([lab[m] for lab in labs]), m == "adabn"), default="adabn")


def few_shot_table(record: dict[str, Any]) -> pd.DataFrame:
    """The rows of a ``few_shot_study`` record as a DataFrame (one row per k), for a notebook."""
    return pd.DataFrame(record["rows"], columns=[*FEW_SHOT_COLUMNS, "draws"])


# --------------------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
    defaults = AdaptRecipe()
    parser = argparse.ArgumentParser(
        prog="bloodcell adapt",
        description="Fine-tune a trained checkpoint on a few labelled cells of one lab (a folder per class) "
                    "and write a checkpoint for that lab (same classes as the parent).")
    parser.add_argument("--checkpoint", required=True, help="the parent checkpoint (checkpoint_best.pt of a run)")
    cells = parser.add_mutually_exclusive_group(required=True)
    cells.add_argument("--folder", help="the lab's cells: one sub-folder per class")
    cells.add_argument("--labels", metavar="CSV",
                       help="a labels file: path,label rows (labels.csv as the review page saves it, or by hand; "
                            "paths absolute or relative to the CSV's folder)")
    parser.add_argument("--unlabelled", metavar="FOLDER",
                        help="first re-estimate BatchNorm statistics on this folder of the lab's unlabelled cells")
    parser.add_argument("--out", required=True, help="checkpoint file to write for the lab")
    parser.add_argument("--k", type=int, default=None,
                        help="with --folder: cells per class to use, drawn with --seed (default all)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"seed (default {defaults.seed})")
    parser.add_argument("--epochs", type=int, default=defaults.epochs, help=f"default {defaults.epochs}")
    parser.add_argument("--lr", type=float, default=defaults.lr, help=f"default {defaults.lr:g}")
    parser.add_argument("--unfreeze-last", type=int, default=defaults.unfreeze_last,
                        help=f"feature stages trained besides the head (default {defaults.unfreeze_last})")
    parser.add_argument("--no-bn", action="store_true", help="skip re-estimating BatchNorm statistics first")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse: 0 for --help, 2 for bad arguments
        return int(exit_.code or 0)
    if Path(args.out).is_dir():
        print(f"error: --out {args.out} is a folder; give a .pt file name", file=sys.stderr)
        return 2
    recipe = AdaptRecipe(epochs=args.epochs, lr=args.lr, unfreeze_last=args.unfreeze_last,
                         adapt_bn=not args.no_bn, seed=args.seed)
    if args.labels and args.k is not None:
        print("error: --k draws cells per class from --folder; a labels file is used whole", file=sys.stderr)
        return 2
    try:
        if args.labels:
            record = adapt_from_labels(args.checkpoint, args.labels, args.out, recipe=recipe, unlabelled=args.unlabelled)
        else:
            record = adapt_checkpoint(args.checkpoint, args.folder, args.out, k=args.k, recipe=recipe,
                                      unlabelled=args.unlabelled)
    except (AdaptError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for note in record["notes"]:
        print(f"note: {note}")
    last = record["history"][-1]
    print(f"adapted {args.checkpoint} on {record['n_cells']} cell(s) of {args.labels or args.folder} "
          f"({', '.join(f'{c} {n}' for c, n in record['cells_per_class'].items())}); "
          f"last epoch train loss {last['train_loss']:.3f} acc {last['train_acc']:.3f}; wrote {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
