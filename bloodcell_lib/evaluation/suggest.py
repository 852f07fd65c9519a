"""Which of a lab's unlabelled cells to label first: ``bloodcell suggest``.

Labels teach a model most about a new lab when the labelled cells cover the lab's
variety (diverse, typical cells: one per region of the feature space) and include the
cells the model is least sure of. The method, for a budget of N cells:

1. every picture is read as ``predict`` reads it (the checkpoint's crop, size and colour
   normalisation) and passed once through the model: calibrated class probabilities and the
   penultimate-layer features (the input of the classifier, ``modeling.neighbours``'s hook;
   L2-normalised, as the k-NN review score uses them);
2. **typical cells**: k-means (scikit-learn, seeded, 10 starts) with k = N - N//5 clusters
   on those features; from each cluster the cell nearest its centre. This is the
   cold-start rule of TypiClust (Hacohen, Dekel and Weinshall, "Active learning on a budget:
   opposite strategies suit high and low budgets", ICML 2022: as many clusters as the
   budget, the most typical cell of each) with "typical" read as "nearest the centroid",
   and it spreads the labels over the lab's feature space as core-set selection does
   (Sener and Savarese, ICLR 2018);
3. **least certain cells**: the remaining N//5 are the cells left with the smallest margin
   between the two most probable classes (margin uncertainty sampling; Settles, "Active
   learning literature survey", 2009), ties by path.

With N or fewer readable cells, all are suggested. Clusters are numbered by size (cluster 1
is the largest), so ``reason`` says how common a cell's kind is in the lab.

Command line::

    bloodcell suggest --checkpoint runs/x/checkpoint_best.pt FOLDER... --n 25 --out to_label/ \
        [--seed 0] [--batch-size 64] [--device auto]

Writes ``to_label.csv`` (path, predicted, confidence, reason), ``review.html`` (the review
page of those cells: label them there and save ``labels.csv`` for ``bloodcell adapt --labels``)
and, when files could not be read, ``suggest_skipped.csv`` (path, reason).
Exit codes: 0 ok, 1 no readable picture, 2 bad arguments or checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from bloodcell_lib.core.distributed import device_argument
from bloodcell_lib.modeling.checkpoint import CheckpointError
from bloodcell_lib.modeling.loaded import LoadedModel, load_checkpoint

UNCERTAIN_SHARE = 5  # one cell in five is chosen for uncertainty, the rest for typicality
LEAST_CERTAIN = "least certain"
COLUMNS = ["path", "predicted", "confidence", "reason"]


class SuggestError(ValueError):
    """Input that ``suggest`` cannot use; the message names the parameter or folder."""


@dataclass
class Suggestion:
    """``chosen``: path, predicted, confidence, reason (typical cells first, by cluster);
    ``skipped``: path, reason; ``n_readable``: cells the choice was made from."""

    chosen: pd.DataFrame
    skipped: pd.DataFrame
    n_readable: int

    def summary(self) -> str:
        typical = int((self.chosen["reason"] != LEAST_CERTAIN).sum())
        lines = [f"suggested {len(self.chosen)} of {self.n_readable} readable cell(s): {typical} typical of "
                 f"their cluster, {len(self.chosen) - typical} least certain; skipped {len(self.skipped)}"]
        lines += [f"  skipped {row.path}: {row.reason}" for row in self.skipped.itertuples(index=False)]
        return "\n".join(lines)


def typical_cells(features: np.ndarray, k: int, seed: int) -> list[tuple[int, int]]:
    """(row, cluster number) of the cell nearest each k-means centre, clusters numbered 1..k
    from the largest; ties by row."""
    from sklearn.cluster import KMeans

    kmeans = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(features)
    sizes = np.bincount(kmeans.labels_, minlength=k)
    order = sorted(range(k), key=lambda c: (-sizes[c], c))
    chosen = []
    for number, cluster in enumerate(order, start=1):
        members = np.flatnonzero(kmeans.labels_ == cluster)
        distance = np.linalg.norm(features[members] - kmeans.cluster_centers_[cluster], axis=1)
        chosen.append((int(members[np.argmin(distance)]), number))
    return chosen


def margins(proba: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability per row (1.0 for a single class)."""
    if proba.shape[1] < 2:
        return np.ones(len(proba))
    top = np.sort(proba, axis=1)
    return top[:, -1] - top[:, -2]


def choose(features: np.ndarray, proba: np.ndarray, paths: Sequence[str], n: int,
           seed: int = 0) -> list[tuple[int, str]]:
    """(row, reason) of the ``n`` cells to label (see the module docstring)."""
    if n >= len(paths):
        return [(i, "all cells suggested (no more than --n)") for i in range(len(paths))]
    k = n - n // UNCERTAIN_SHARE
    chosen = [(row, f"typical of cluster {number}") for row, number in typical_cells(features, k, seed)]
    taken = {row for row, _ in chosen}
    margin = margins(proba)
    rest = sorted((i for i in range(len(paths)) if i not in taken), key=lambda i: (margin[i], paths[i]))
    return chosen + [(i, LEAST_CERTAIN) for i in rest[:n - len(chosen)]]


def cell_scores(loaded: LoadedModel, images_uint8: torch.Tensor, *,
                batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(L2-normalised penultimate features float64 [N, D], calibrated probabilities [N, K]) of
    uint8 cells: what ``choose`` reads (step 1 of the module docstring)."""
    from bloodcell_lib.evaluation.features import logits_features
    from bloodcell_lib.modeling.neighbours import normalise

    logits, features = logits_features(loaded, images_uint8, batch_size=batch_size)
    return normalise(features).numpy().astype(np.float64), loaded.probabilities(logits)


def suggest(loaded: LoadedModel, folders: Sequence[str | Path], n: int, *,
            seed: int = 0, batch_size: int = 64) -> Suggestion:
    """The ``n`` cells under ``folders`` to label first (``loaded`` from ``load_checkpoint``)."""
    from bloodcell_lib.evaluation.adapt_bn import load_folder_images

    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise SuggestError(f"--n must be an integer >= 1 (cells to suggest), got {n!r}")
    parts, paths, skipped = [], [], []
    for folder in folders:
        images, found, failed = load_folder_images(folder, loaded)
        parts.append(images)
        paths += found
        skipped += failed
    if not paths:
        raise SuggestError("no readable cell picture in " + ", ".join(str(f) for f in folders)
                           + "".join(f"\n  {path}: {reason}" for path, reason in skipped[:10]))
    features, proba = cell_scores(loaded, torch.cat(parts), batch_size=batch_size)
    picked = choose(features, proba, paths, int(n), seed)
    rows = [i for i, _ in picked]
    chosen = pd.DataFrame({"path": [paths[i] for i in rows],
                           "predicted": [loaded.class_names[j] for j in proba[rows].argmax(axis=1)],
                           "confidence": proba[rows].max(axis=1).round(4),
                           "reason": [reason for _, reason in picked]}, columns=COLUMNS)
    return Suggestion(chosen, pd.DataFrame(skipped, columns=["path", "reason"]), len(paths))


def write_suggestion(result: Suggestion, out_dir: str | Path, class_names: Sequence[str]) -> Path:
    """to_label.csv, review.html and (when files were skipped) suggest_skipped.csv in ``out_dir``."""
    from bloodcell_lib.core.fileio import atomic_write_text
    from bloodcell_lib.evaluation.review_page import write_review_page

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "to_label.csv", result.chosen.to_csv(index=False))
    rows = [{**row, "needs_review": row["reason"] == LEAST_CERTAIN} for row in result.chosen.to_dict("records")]
    write_review_page(rows, class_names, out / "review.html", f"Cells to label ({len(rows)})")
    skipped = out / "suggest_skipped.csv"
    if len(result.skipped):
        atomic_write_text(skipped, result.skipped.to_csv(index=False))
    elif skipped.is_file():  # a list from an earlier run would now mislead
        skipped.unlink()
    return out


# --------------------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bloodcell suggest",
        description="Pick the N cells of a lab's unlabelled folders whose labels teach the model most: "
                    "typical cells of N - N//5 feature clusters plus the N//5 least certain. Writes "
                    "to_label.csv and review.html (label the cells there, save labels.csv, then "
                    "`bloodcell adapt --labels`).")
    parser.add_argument("folders", nargs="+", metavar="FOLDER", help="folders of the lab's unlabelled cell pictures")
    parser.add_argument("--checkpoint", required=True, help="checkpoint_best.pt of a run (a .pt file)")
    parser.add_argument("--n", type=int, required=True, help="how many cells to suggest for labelling")
    parser.add_argument("--out", required=True, help="output folder (to_label.csv, review.html)")
    parser.add_argument("--seed", type=int, default=0, help="k-means seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--device", default="auto", type=device_argument,
                        help="auto (default: cuda where torch sees a GPU, else cpu), cpu or cuda")
    return parser


def _bad_arguments(args: argparse.Namespace) -> str | None:
    if args.n < 1:
        return f"--n must be >= 1 (cells to suggest), got {args.n}"
    if args.batch_size < 1:
        return f"--batch-size must be >= 1, got {args.batch_size}"
    if not Path(args.checkpoint).is_file():
        return f"--checkpoint {args.checkpoint}: no such file"
    for folder in args.folders:
        path = Path(folder)
        if not path.is_dir():
            return f"{folder}: " + ("not a folder (give folders of cell pictures)" if path.exists() else "no such folder")
        if not any(p.is_file() for p in path.rglob("*")):
            return f"{folder}: the folder is empty"
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
        loaded = load_checkpoint(args.checkpoint, args.device)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        result = suggest(loaded, args.folders, args.n, seed=args.seed, batch_size=args.batch_size)
    except SuggestError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    try:
        out = write_suggestion(result, args.out, loaded.class_names)
    except OSError as err:
        print(f"error: cannot write {args.out}: {err}", file=sys.stderr)
        return 2
    print(result.summary())
    print(f"wrote {out / 'to_label.csv'} and {out / 'review.html'}"
          + (f" and {out / 'suggest_skipped.csv'}" if len(result.skipped) else "")
          + "; label the cells on the page, press Save labels, then: bloodcell adapt --checkpoint "
          f"{args.checkpoint} --labels labels.csv --out lab.pt")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
