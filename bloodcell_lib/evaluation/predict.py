"""Classify image files and folders with a trained checkpoint.

One inference path for everything: ``predict_views`` turns a uint8 image batch
[N, 3, S, S] (the output of ``transforms.pil_to_uint8``, which the cache also uses) into
class probabilities per test-time view, ``predict_tensors`` averages them;
``predict_images`` (files and folders) and ``evaluate`` (cached split images) both call it.

Command line::

    bloodcell predict --checkpoint runs/x/checkpoint_best.pt IMG_OR_FOLDER... \
        [--out predictions.csv] [--batch-size 64] [--tta] [--no-calibration]
        [--adapt LAB_FOLDER [--adapt-method adabn|adabn-balanced|t3a|shot]]
        [--engine torch|onnxruntime|openvino]

Probabilities are calibrated by the checkpoint's temperature (``calibration`` entry, fitted
on validation data; see docs/calibration.md) unless ``--no-calibration``; every row has an
``ood_score`` and, when the checkpoint holds review thresholds, ``needs_review`` and
``review_reason`` (modeling/review.py), and with a conformal entry ``prediction_set``
(modeling/conformal.py).

``--adapt`` first adapts the model to a folder of the lab's unlabelled cells
(``unlabelled_adapt``: ``--adapt-method``, default AdaBN, BatchNorm statistics re-estimated),
then classifies.

Every file under a folder is tried; files that are not images or are damaged are listed
with the reason (in the summary and in ``<out>_skipped.csv``), never dropped silently.
Exit codes: 0 ok, 1 nothing could be classified, 2 bad arguments or checkpoint.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from bloodcell_lib.evaluation.engines import ENGINE_NAMES, Engine, EngineError, as_engine, engine_for_model, open_engine
from bloodcell_lib.evaluation.pictures import CROP_NOT_FOUND, Framed, iter_files, load_framed, preprocessing_summary
from bloodcell_lib.modeling.checkpoint import CheckpointError
from bloodcell_lib.modeling.loaded import LoadedModel, load_checkpoint

@dataclass
class PredictionResult:
    """``predictions``: path, predicted, confidence[, crop], prob_<class>..., ood_score[, needs_review,
    review_reason][, prediction_set]; ``skipped``: path, reason; ``review``: review_summary of the predictions
    (None when the checkpoint holds no review thresholds); ``calibration``: how the
    probabilities were made. ``crop`` (column and field): what a model trained on crops was
    given, see ``crop_like_training``; absent for a model trained on whole pictures."""

    predictions: pd.DataFrame
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["path", "reason"]))
    seconds: float = 0.0
    review: dict[str, Any] | None = None
    calibration: str = ""
    crop: str | None = None  # the checkpoint's training crop (stain, nucleus, cell), None for whole pictures

    def summary(self) -> str:
        lines = [f"classified {len(self.predictions)} image(s); skipped {len(self.skipped)}"]
        if self.calibration:
            lines.append(self.calibration)
        if self.crop is not None and len(self.predictions):
            counts = self.predictions["crop"].value_counts()
            trained_on = ("annotated WBC boxes (crop: cell), which new pictures lack; the stain crop stands in"
                          if self.crop == "cell" else f"{self.crop} crops (crop: {self.crop})")
            lines.append(f"crop: the model was trained on {trained_on}: "
                         + ", ".join(f"{note} {n}" for note, n in counts.items()))
        if len(self.predictions):
            counts = self.predictions["predicted"].value_counts().sort_index()
            lines.append("predicted: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        if self.review is not None:
            from bloodcell_lib.modeling.review import summary_line

            lines.append(summary_line(self.review))
        for row in self.skipped.itertuples(index=False):
            lines.append(f"  skipped {row.path}: {row.reason}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- inference

def calibration_note(loaded: LoadedModel) -> str:
    """One line saying how the probabilities of ``loaded``'s model are made."""
    cal = loaded.calibration
    if not cal:
        return "uncalibrated: this checkpoint holds no calibration (raw softmax probabilities)"
    if not loaded.calibrated:
        return "uncalibrated: raw softmax probabilities (--no-calibration)"
    return (f"calibrated: temperature {cal['temperature']:.3f} fitted on {cal['n']} {cal['fitted_on']} images "
            f"(val ECE {cal['ece_before']:.3f} -> {cal['ece_after']:.3f})")


def _views(x: torch.Tensor, tta: bool) -> Iterable[torch.Tensor]:
    if not tta:
        return (x,)
    from bloodcell_lib.data.transforms import tta_views

    return tta_views(x)


def predict_views(runner: LoadedModel | Engine, images_uint8: Any, *,
                  batch_size: int = 64, tta: bool = False) -> np.ndarray:
    """Class probabilities of every test-time view (float32 [V, N, K]) for uint8 images
    [N, 3, S, S]: V = 1 without ``tta``, else the dihedral views of ``transforms.tta_views``.
    View 0 is always the image as given, so one pass yields both the plain and the averaged
    prediction (``evaluate.evaluate_plain_and_tta``). Calibrated: softmax of the logits
    divided by the model's temperature.

    ``runner``: a LoadedModel (run on torch as it is) or an engine (``engines.open_engine``).
    Images must have the checkpoint's size (``image_size``), as made by ``transforms.pil_to_uint8``.
    """
    engine = as_engine(runner)
    return engine.loaded.probabilities(logit_views(engine, images_uint8, batch_size=batch_size, tta=tta))


def logit_views(runner: LoadedModel | Engine, images_uint8: Any, *,
                batch_size: int = 64, tta: bool = False) -> np.ndarray:
    """Raw logits (float32 [V, N, K]) of every test-time view; as ``predict_views``."""
    return scored_views(runner, images_uint8, batch_size=batch_size, tta=tta, with_ood=False)[0]


@torch.inference_mode()
def scored_views(runner: LoadedModel | Engine, images_uint8: Any, *,
                 batch_size: int = 64, tta: bool = False, with_ood: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Raw logits (float32 [V, N, K]) and the OOD score (float64 [V, N]) of every view, from
    one pass: the score the review flags use (``LoadedModel.ood_score_name``): the k-NN distance in
    feature space when the model carries a feature bank, else the energy of the logits.
    Without ``with_ood`` the score is not computed (NaN): callers that want probabilities only
    (cross-lab scoring, the few-shot study, field typing) skip the feature hook and the k-NN
    search. An ONNX/OpenVINO engine computes its graph's outputs either way."""
    from bloodcell_lib.data.transforms import normalize_batch
    from bloodcell_lib.modeling.review import energy_score

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    engine = as_engine(runner)
    loaded = engine.loaded
    x_all = torch.as_tensor(images_uint8)
    k = len(loaded.class_names)
    if x_all.ndim != 4 or x_all.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, S, S]; got {tuple(x_all.shape)}")
    if x_all.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (from pil_to_uint8); got {x_all.dtype}")
    size = loaded.image_size
    if tuple(x_all.shape[2:]) != (size, size):
        raise ValueError(f"images are {tuple(x_all.shape[2:])} but the checkpoint expects {size}x{size}")
    n_views = len(list(_views(x_all[:0], tta)))
    logits_out = np.empty((n_views, len(x_all), k), dtype=np.float32)
    ood_out = np.full((n_views, len(x_all)), np.nan, dtype=np.float64)
    if len(x_all) == 0:
        return logits_out, ood_out
    use_knn = with_ood and loaded.ood_score_name == "knn"
    for start in range(0, len(x_all), batch_size):
        x = x_all[start:start + batch_size].to(engine.device)
        for v, view in enumerate(_views(x, tta)):
            logits, knn = engine.run(normalize_batch(view, loaded.data_config, engine.channels_last), knn=use_knn)
            logits_out[v, start:start + len(x)] = logits
            if with_ood:
                ood_out[v, start:start + len(x)] = knn if use_knn else energy_score(logits)
    return logits_out, ood_out


def predict_tensors(runner: LoadedModel | Engine, images_uint8: Any, *,
                    batch_size: int = 64, tta: bool = False) -> np.ndarray:
    """Class probabilities (float32 [N, K], rows sum to 1) for uint8 images [N, 3, S, S]:
    with ``tta`` the softmax averaged over the views of ``predict_views``."""
    return predict_views(runner, images_uint8, batch_size=batch_size, tta=tta).mean(axis=0)


def proba_and_ood(logits: np.ndarray, ood: np.ndarray, loaded: LoadedModel) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [N, K], OOD score [N]), each averaged over the views, from
    ``scored_views``. Neither score depends on the temperature, so its threshold holds with
    and without calibration."""
    return loaded.probabilities(logits).mean(axis=0), np.asarray(ood, dtype=np.float64).mean(axis=0)


def with_review_columns(frame: pd.DataFrame, proba: np.ndarray, ood: np.ndarray, loaded: LoadedModel) -> pd.DataFrame:
    """``frame`` plus ood_score; with ``loaded``'s review thresholds needs_review and
    review_reason; with its conformal entry prediction_set (modeling.conformal)."""
    from bloodcell_lib.modeling.conformal import prediction_sets, set_labels
    from bloodcell_lib.modeling.review import review_flags

    frame = frame.assign(ood_score=np.asarray(ood, dtype=np.float64))
    if loaded.review:
        flagged, reasons = review_flags(proba, ood, loaded.review, input_checks(frame, proba, loaded))
        frame = frame.assign(needs_review=flagged, review_reason=reasons)
    if loaded.conformal:
        frame = frame.assign(prediction_set=set_labels(prediction_sets(proba, loaded.conformal), proba,
                                                       loaded.class_names))
    return frame


def input_checks(frame: pd.DataFrame, proba: np.ndarray, loaded: LoadedModel) -> dict[str, np.ndarray]:
    """The review flags read off the pictures themselves (``review.INPUT_CHECKS``), from a
    predictions frame: ``no_cell_found`` where the model needs a nucleus-based crop and none was
    found (``crop`` notes), ``unlike_training_scale`` where a ``crop: window`` model's nucleus
    size lies outside the predicted class's validation range (``nucleus_px``, review ``scale``)."""
    from bloodcell_lib.data.stain import WINDOW_CENTRE
    from bloodcell_lib.modeling.review import NO_CELL, OFF_SCALE, off_scale

    checks = {}
    if "crop" in frame:
        checks[NO_CELL] = frame["crop"].isin([CROP_NOT_FOUND, WINDOW_CENTRE]).to_numpy()
    scale = (loaded.review or {}).get("scale")
    if scale and "nucleus_px" in frame:
        checks[OFF_SCALE] = off_scale(proba, frame["nucleus_px"].to_numpy(), scale, loaded.class_names)
    return checks


def unlabelled_review(proba: np.ndarray, ood: np.ndarray, loaded: LoadedModel,
                      checks: dict[str, np.ndarray] | None = None) -> dict[str, Any] | None:
    """What ``loaded``'s review flags do on these cells (``review.review_summary`` without
    labels), and with a conformal entry the prediction sets' sizes under ``sets``, counted over
    the cells like the calibration cells only (``n_outside``: the others, for which the
    coverage is not claimed); None when the checkpoint holds no review thresholds."""
    from bloodcell_lib.modeling.conformal import prediction_sets, set_summary
    from bloodcell_lib.modeling.review import review_summary, unlike_calibration

    if not loaded.review:
        return None
    summary = review_summary(proba, None, ood, loaded.review, checks)
    if loaded.conformal:
        outside = unlike_calibration(ood, loaded.review, checks)
        summary["sets"] = {"alpha": loaded.conformal["alpha"], "n_outside": int(outside.sum()),
                           **set_summary(prediction_sets(np.asarray(proba)[~outside], loaded.conformal))}
    return summary


def _chunks(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def engine_of(checkpoint_or_runner: str | os.PathLike | LoadedModel | Engine, device: str,
              engine: str | None) -> Engine:
    """The engine of a checkpoint or ONNX path (``engines.open_engine``), of a LoadedModel (torch) or
    the engine given."""
    if isinstance(checkpoint_or_runner, (str, os.PathLike)):
        return open_engine(checkpoint_or_runner, engine, device=device)
    return as_engine(checkpoint_or_runner)


def prediction_frame(paths: Sequence[str], proba: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    """DataFrame path, predicted, confidence, prob_<class>... from probabilities."""
    proba = np.asarray(proba, dtype=np.float32).reshape(len(paths), len(class_names))
    idx = proba.argmax(axis=1) if len(paths) else np.zeros(0, dtype=int)
    frame = pd.DataFrame({
        "path": list(paths),
        "predicted": [class_names[i] for i in idx],
        "confidence": proba.max(axis=1) if len(paths) else np.zeros(0, dtype=np.float32),
    })
    for j, name in enumerate(class_names):
        frame[f"prob_{name}"] = proba[:, j]
    return frame


def predict_images(checkpoint_or_runner: str | os.PathLike | LoadedModel | Engine, paths: Sequence[str | os.PathLike] | str | os.PathLike, *,
                   batch_size: int = 64, tta: bool = False, device: str = "cpu",
                   progress: bool = False, engine: str | None = None,
                   decode_threads: int = 2) -> PredictionResult:
    """Classify files and folders (walked recursively, sorted) in batches of ``batch_size``.

    ``checkpoint_or_runner``: a ``.pt`` checkpoint or exported ``.onnx`` path (run by
    ``engine``, default the fastest installed: ``engines.open_engine``), a LoadedModel
    (``load_checkpoint``, run on torch) or an engine of ``open_engine``.
    Images of any PIL mode are converted by ``images.load_rgb``; files that cannot be
    decoded are returned in ``skipped`` with the reason. ``decode_threads`` files are
    decoded at a time, overlapping inference.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    runner = engine_of(checkpoint_or_runner, device, engine)
    loaded = runner.loaded
    size = loaded.image_size
    t0 = time.perf_counter()
    done_paths: list[str] = []
    crops: list[str | None] = []
    nucleus_px: list[float] = []
    probas: list[np.ndarray] = []
    oods: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    files = list(iter_files(paths))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(files), unit="img", desc="predict")

    def decode(item: tuple[str, str | None]) -> tuple[str, torch.Tensor | None, Framed | None, str | None]:
        path, reason = item
        tensor = framed = None
        if reason is None:
            tensor, framed, reason = load_framed(path, size, loaded.data_config)
        return path, tensor, framed, reason

    # The pool decodes chunk i+1 while the model runs on chunk i (PIL and the engines release
    # the GIL), so reading files and inference overlap and decoding may use several cores.
    from concurrent.futures import ThreadPoolExecutor

    chunks = list(_chunks(files, batch_size))
    with ThreadPoolExecutor(max_workers=max(1, decode_threads)) as pool:
        pending = [pool.submit(decode, item) for item in chunks[0]] if chunks else []
        for i in range(len(chunks)):
            decoded = [future.result() for future in pending]
            pending = [pool.submit(decode, item) for item in chunks[i + 1]] if i + 1 < len(chunks) else []
            good_paths, tensors = [], []
            for path, tensor, framed, reason in decoded:
                if reason is not None:
                    skipped.append((path, reason))
                else:
                    good_paths.append(path)
                    tensors.append(tensor)
                    crops.append(framed.note)
                    nucleus_px.append(framed.nucleus_px)
            if tensors:
                proba, ood = proba_and_ood(*scored_views(runner, torch.stack(tensors), batch_size=batch_size,
                                                         tta=tta), loaded)
                probas.append(proba)
                oods.append(ood)
                done_paths.extend(good_paths)
            if bar is not None:
                bar.update(len(decoded))
    if bar is not None:
        bar.close()
    k = len(loaded.class_names)
    proba = np.concatenate(probas) if probas else np.zeros((0, k), dtype=np.float32)
    ood = np.concatenate(oods) if oods else np.zeros(0)
    predictions = prediction_frame(done_paths, proba, loaded.class_names)
    crop_mode = loaded.crop
    if crop_mode is not None:
        predictions.insert(3, "crop", pd.Series(crops, dtype=object))
    if crop_mode == "window":
        predictions.insert(4, "nucleus_px", pd.Series(nucleus_px, dtype=np.float64))
    return PredictionResult(
        predictions=with_review_columns(predictions, proba, ood, loaded),
        skipped=pd.DataFrame(skipped, columns=["path", "reason"]),
        seconds=time.perf_counter() - t0,
        review=unlabelled_review(proba, ood, loaded, input_checks(predictions, proba, loaded)),
        calibration=calibration_note(loaded),
        crop=crop_mode,
    )


# --------------------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bloodcell predict",
        description="Classify images (files, or folders walked recursively) with a trained checkpoint. "
                    "Writes one CSV row per image: path, predicted, confidence, prob_<class>...; "
                    "files that are not readable images are listed with the reason.")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders")
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint_best.pt (or _last.pt) of a run, or a .onnx file made by `export`")
    parser.add_argument("--engine", choices=ENGINE_NAMES,
                        help="inference runtime (default: the fastest installed; named in the output)")
    parser.add_argument("--out", default="predictions.csv",
                        help="CSV to write (default predictions.csv); skipped files go to <out>_skipped.csv")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average the softmax over flips/rotations (8x slower)")
    parser.add_argument("--no-calibration", action="store_true",
                        help="raw softmax probabilities instead of the checkpoint's calibrated ones "
                             "(no review flags then: their thresholds assume calibrated probabilities)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device, cpu or cuda (default: cuda where torch sees a GPU, else cpu, as device: auto)")
    parser.add_argument("--progress", action="store_true", help="show a progress bar")
    add_adapt_arguments(parser)
    parser.add_argument("--html", metavar="PAGE",
                        help="also write the review page of the predictions (flagged cells first): label cells "
                             "there and save labels.csv for `bloodcell adapt --labels`")
    return parser


def add_adapt_arguments(parser: argparse.ArgumentParser) -> None:
    """``--adapt FOLDER`` and ``--adapt-method M`` (``predict`` and ``count``)."""
    from bloodcell_lib.evaluation.unlabelled_adapt import DEFAULT_METHOD, METHODS

    parser.add_argument("--adapt", metavar="FOLDER",
                        help="first adapt the model to this folder of the lab's unlabelled cells (no labels read)")
    parser.add_argument("--adapt-method", choices=METHODS, default=DEFAULT_METHOD,
                        help=f"how --adapt adapts (default {DEFAULT_METHOD}; docs/adapting.md)")


def main(argv: list[str] | None = None) -> int:
    from bloodcell_lib.core.fileio import atomic_write_text

    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: 0 for --help, 2 for bad arguments
        return int(exit_.code or 0)
    if args.batch_size < 1:
        print(f"error: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    missing = [p for p in args.paths + ([args.adapt] if args.adapt else []) if not Path(p).exists()]
    if missing:
        print("error: no such file or folder: " + ", ".join(missing), file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and out.is_dir():
        print(f"error: --out {out} is a folder; give a .csv file name", file=sys.stderr)
        return 2
    try:
        if args.device != "cpu" and not torch.device(args.device).type == "cpu":
            torch.empty(0, device=args.device)
    except Exception as err:
        print(f"error: device {args.device!r} is not usable here ({err})", file=sys.stderr)
        return 2
    try:
        if args.adapt:  # BatchNorm statistics are re-estimated on the torch model, then it runs on the engine
            loaded = load_checkpoint(args.checkpoint, args.device, calibrated=not args.no_calibration)
        else:
            runner = open_engine(args.checkpoint, args.engine, device=args.device, calibrated=not args.no_calibration)
    except (CheckpointError, EngineError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from bloodcell_lib.evaluation.unlabelled_adapt import adapt_to_folder_by

    if args.adapt:
        try:
            print(adapt_to_folder_by(loaded, args.adapt, args.adapt_method, batch_size=args.batch_size).summary())
            runner = engine_for_model(loaded, args.engine, device=args.device)
        except (ValueError, EngineError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    print(preprocessing_summary(runner.loaded))
    result = predict_images(runner, args.paths, batch_size=args.batch_size, tta=args.tta,
                            device=args.device, progress=args.progress)
    skipped_out = out.with_name(out.stem + "_skipped.csv")
    try:
        atomic_write_text(out, result.predictions.to_csv(index=False))
        if len(result.skipped):
            atomic_write_text(skipped_out, result.skipped.to_csv(index=False))
        elif skipped_out.is_file():  # a list from an earlier run would now mislead
            skipped_out.unlink()
        if args.html:  # evaluation/review_page.py
            from bloodcell_lib.evaluation.review_page import write_review_page
            write_review_page(result.predictions.to_dict("records"), runner.loaded.class_names, args.html,
                              f"Review {len(result.predictions)} predicted cells")
    except OSError as err:
        print(result.summary())
        print(f"error: cannot write {out}: {err}", file=sys.stderr)
        return 2
    n = len(result.predictions)
    rate = n / result.seconds if result.seconds > 0 else float("nan")
    print(result.summary())
    print(f"wrote {out} ({n} rows, {rate:.1f} img/s, engine {runner.name}{', TTA' if args.tta else ''})"
          + (f" and {skipped_out} ({len(result.skipped)} skipped)" if len(result.skipped) else ""))
    if n == 0:
        reasons = Counter(result.skipped["reason"])
        print("error: no image could be classified" + (f" ({dict(reasons)})" if reasons else ""),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
