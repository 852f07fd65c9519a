"""Smear fields in, a white-cell differential out: ``bloodcell count``.

Every white cell of each field is found by its nucleus (``data.nuclei.find_nuclei``), cropped
the way the checkpoint's training pictures were cropped, and classified through the one
inference path (``predict.predict_tensors``). Written to ``--out`` (a folder):

- ``cells.csv``: path, cell, xmin, ymin, xmax, ymax, predicted, confidence, prob_<class>...,
  ood_score, and where the checkpoint holds review thresholds (calibrated probabilities)
  needs_review, review_reason and prediction_set, exactly as ``predict`` flags a cell
  (modeling/review.py, modeling/conformal.py);
- ``fields.csv``: every field with its number of cells, or why none was counted;
- ``differential.csv``: per field, per folder (and all folders): count, percent, 95 % Wilson interval;
- ``skipped.csv``: files that are not readable images, with the reason (as ``predict``);
- ``overlays/``: each field with numbered, labelled boxes; ``index.html``: the batch on one page.

Command line::

    bloodcell count --checkpoint runs/bccd/fold_0/checkpoint_best.pt FIELD_OR_FOLDER... \
        [--out count] [--batch-size 64] [--tta] [--device auto] [--engine onnxruntime] [--no-overlays]
        [--adapt LAB_FIELDS [--adapt-method adabn|adabn-balanced|t3a|shot]]

``--adapt`` first adapts the model to the lab's unlabelled cells: every white cell found in
the fields under LAB_FIELDS, cropped as the counted cells are (``unlabelled_adapt``; the
fields counted may be the same ones: no label is read).

Exit codes: 0 ok, 1 no field could be read, 2 bad arguments or checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch

from bloodcell_lib.core.distributed import device_argument
from bloodcell_lib.data.images import ImageLoadError, load_rgb
from bloodcell_lib.data.nuclei import crop_box, find_nuclei
from bloodcell_lib.evaluation.differential import differential
from bloodcell_lib.evaluation.engines import ENGINE_NAMES, EngineError, engine_for_model, open_engine
from bloodcell_lib.evaluation.pictures import iter_files
from bloodcell_lib.evaluation.predict import (add_adapt_arguments, engine_of, prediction_frame, proba_and_ood,
                                              scored_views, unlabelled_review, with_review_columns)
from bloodcell_lib.modeling.checkpoint import CheckpointError
from bloodcell_lib.modeling.loaded import LoadedModel, load_checkpoint

NO_CELL_REASON = "no white-cell nucleus found (no violet region large enough)"


@dataclass
class CountResult:
    """The tables ``count_fields`` wrote, and where."""

    cells: pd.DataFrame
    fields: pd.DataFrame
    differential: pd.DataFrame
    skipped: pd.DataFrame
    out_dir: Path
    seconds: float
    review: dict[str, Any] | None = None  # review_summary of the cells, where the checkpoint has thresholds

    def summary(self) -> str:
        counted = int((self.fields["cells"] > 0).sum())
        lines = [f"{len(self.fields)} field(s): {len(self.cells)} white cell(s) in {counted}, none found in "
                 f"{len(self.fields) - counted}; {len(self.skipped)} file(s) skipped"]
        if self.review is not None:
            from bloodcell_lib.modeling.review import summary_line

            lines.append(summary_line(self.review))
        if len(self.cells):
            counts = self.cells["predicted"].value_counts().sort_index()
            lines.append("predicted: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        lines += [f"  skipped {row.path}: {row.reason}" for row in self.skipped.itertuples(index=False)]
        return "\n".join(lines)


def _read_fields(files, size: int, data_config: dict[str, Any]):
    """(field rows, cell boxes, crops as uint8 tensors, skipped rows) of every file."""
    from tqdm import tqdm

    from bloodcell_lib.data.transforms import pil_to_uint8

    fields, boxes, crops, skipped = [], [], [], []
    for path, reason in tqdm(files, unit="field", desc="count", disable=not sys.stderr.isatty()):
        if reason is None:
            try:
                image = load_rgb(path)
            except ImageLoadError as err:
                reason = err.reason
        if reason is not None:
            skipped.append((path, reason))
            continue
        found = find_nuclei(image)
        fields.append({"path": path, "cells": len(found), "reason": "" if found else NO_CELL_REASON})
        for number, cell in enumerate(found, start=1):
            boxes.append((path, number, *cell.cell))
            crops.append(pil_to_uint8(image.crop(crop_box(cell, data_config, image.size)), size))
    return fields, boxes, crops, skipped


def _differentials(cells: pd.DataFrame, fields: pd.DataFrame, class_names: Sequence[str]) -> pd.DataFrame:
    """Per field, per folder, and over all fields when they come from several folders."""
    cell_folders = cells["path"].map(lambda p: str(Path(p).parent))
    field_folders = fields["path"].map(lambda p: str(Path(p).parent))
    parts = [differential(cells["predicted"][cells["path"] == p], class_names, p).assign(level="field")
             for p in fields["path"]]
    parts += [differential(cells["predicted"][cell_folders == folder], class_names, folder).assign(level="folder")
              for folder in dict.fromkeys(field_folders)]
    if field_folders.nunique() > 1:
        parts.append(differential(cells["predicted"], class_names, "(all fields)").assign(level="all"))
    columns = ["level", "scope", "class", "count", "total", "percent", "ci_low", "ci_high"]
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    return table[columns].round({"percent": 2, "ci_low": 2, "ci_high": 2})


def count_fields(checkpoint: Any, paths: Sequence[str | os.PathLike] | str | os.PathLike,
                 out_dir: str | os.PathLike, *, batch_size: int = 64, tta: bool = False, device: str = "cpu",
                 overlays: bool = True) -> CountResult:
    """Find, classify and count the white cells of every field under ``paths`` (files or
    folders, walked recursively); write the tables, overlays and ``index.html`` to ``out_dir``.

    ``checkpoint``: a checkpoint or ONNX path (run on the fastest installed engine), a
    LoadedModel of ``load_checkpoint`` (run on torch) or an engine of ``engines.open_engine``. Each
    cell gets the checkpoint's review flags, as in ``predict``.
    """
    from bloodcell_lib.evaluation.count_report import write_outputs

    started = time.perf_counter()
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    runner = engine_of(checkpoint, device, None)  # a checkpoint path runs on the default engine
    loaded = runner.loaded
    fields, boxes, crops, skipped = _read_fields(list(iter_files(paths)), loaded.image_size,
                                                 loaded.data_config)
    size = loaded.image_size
    images = torch.stack(crops) if crops else torch.zeros((0, 3, size, size), dtype=torch.uint8)
    proba, ood = proba_and_ood(*scored_views(runner, images, batch_size=batch_size, tta=tta), loaded)
    box_frame = pd.DataFrame(boxes, columns=["path", "cell", "xmin", "ymin", "xmax", "ymax"])
    predicted = prediction_frame(list(box_frame["path"]), proba, loaded.class_names).drop(columns="path")
    cells = with_review_columns(pd.concat([box_frame, predicted], axis=1), proba, ood, loaded)
    fields = pd.DataFrame(fields, columns=["path", "cells", "reason"])
    result = CountResult(cells=cells, fields=fields,
                         differential=_differentials(cells, fields, loaded.class_names),
                         skipped=pd.DataFrame(skipped, columns=["path", "reason"]),
                         out_dir=Path(out_dir), seconds=0.0,
                         review=unlabelled_review(proba, ood, loaded))
    write_outputs(result, loaded, overlays=overlays)
    result.seconds = time.perf_counter() - started
    return result


def adapt_to_fields(loaded: LoadedModel, folder: str | os.PathLike, method: str, *,
                    batch_size: int = 64) -> Any:
    """``unlabelled_adapt.adapt_unlabelled`` (in place) on every white cell of the fields under
    ``folder``, found and cropped as ``count_fields`` finds and crops the cells it counts."""
    from bloodcell_lib.evaluation.unlabelled_adapt import adapt_unlabelled

    size = loaded.image_size
    _, _, crops, skipped = _read_fields(list(iter_files([folder])), size, loaded.data_config)
    images = torch.stack(crops) if crops else torch.zeros((0, 3, size, size), dtype=torch.uint8)
    done = adapt_unlabelled(loaded, images, method, source=f"the fields under {folder}", batch_size=batch_size)
    done.skipped = skipped
    return done


# --------------------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bloodcell count",
        description="Find every white cell in smear fields (files, or folders walked recursively), classify "
                    "each with a checkpoint and write a differential count with 95%% Wilson intervals, "
                    "per-cell and per-field CSVs, overlays and an HTML page.")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="field images and/or folders of them")
    parser.add_argument("--checkpoint", required=True, help="checkpoint_best.pt (or _last.pt) of a run")
    parser.add_argument("--out", default="count", help="output folder (default ./count)")
    parser.add_argument("--batch-size", type=int, default=64, help="cells per forward pass (default 64)")
    parser.add_argument("--tta", action="store_true", help="average the softmax over flips/rotations (8x slower)")
    parser.add_argument("--device", default="auto", type=device_argument,
                        help="auto (default: cuda where torch sees a GPU, else cpu), cpu or cuda")
    parser.add_argument("--engine", choices=ENGINE_NAMES, default=None,
                        help="inference runtime (default: the fastest installed; torch on an accelerator)")
    parser.add_argument("--no-overlays", action="store_true", help="skip the overlay PNGs (faster)")
    add_adapt_arguments(parser)
    return parser


def _bad_arguments(args: argparse.Namespace) -> str | None:
    if args.batch_size < 1:
        return f"--batch-size must be >= 1, got {args.batch_size}"
    missing = [p for p in args.paths + ([args.adapt] if args.adapt else []) if not Path(p).exists()]
    if missing:
        return "no such file or folder: " + ", ".join(missing)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        return f"--out {args.out} is a file; give a folder name"
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse: 0 for --help, 2 for bad arguments
        return int(exit_.code or 0)
    problem = _bad_arguments(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        if args.adapt:  # adapted on the torch model, then run on the engine
            loaded = load_checkpoint(args.checkpoint, args.device)
            print(adapt_to_fields(loaded, args.adapt, args.adapt_method, batch_size=args.batch_size).summary())
            runner = engine_for_model(loaded, args.engine, device=args.device)
        else:
            runner = open_engine(args.checkpoint, args.engine, device=args.device)
    except (CheckpointError, EngineError, RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        result = count_fields(runner, args.paths, args.out, batch_size=args.batch_size, tta=args.tta,
                              device=args.device, overlays=not args.no_overlays)
    except OSError as err:
        print(f"error: cannot write {args.out}: {err}", file=sys.stderr)
        return 2
    print(result.summary())
    print(f"wrote {result.out_dir}/ (cells.csv, fields.csv, differential.csv, index.html) in {result.seconds:.1f} s"
          f", engine {runner.name}")
    if len(result.fields) == 0:
        print("error: no field could be read", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
