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

from bloodcell_lib.modeling.checkpoint import CheckpointError, read_checkpoint

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


# --------------------------------------------------------------------------- checkpoint

def image_size_of(data_config: dict[str, Any], config: dict[str, Any] | None = None) -> int:
    """Square input size from a data config (image_size, or input_size (C, H, W)), else the train config."""
    if data_config.get("image_size"):
        return int(data_config["image_size"])
    size = data_config.get("input_size")
    if size:
        return int(size[-1]) if isinstance(size, (list, tuple)) else int(size)
    if config and config.get("image_size"):
        return int(config["image_size"])
    raise ValueError("data_config names no image_size or input_size")


def load_checkpoint(path: str | os.PathLike, device: str = "cpu", *,
                    calibrated: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint (eval mode, on ``device``) and its metadata.

    ``meta``: path, class_names, model_name, data_config (mean, std, image_size, ...),
    image_size, channels_last, config (the TrainConfig dict), epoch, best_metric,
    calibration and review (the checkpoint's entries, None if absent), feature_bank (the k-NN
    OOD score's, None if absent), calibrated (bool), temperature (what
    ``predict_views`` divides the logits by: 1.0 without calibration or ``calibrated=False``).
    """
    from bloodcell_lib.modeling.models import create_model

    path = Path(path)
    ckpt = read_checkpoint(path, device)
    config = dict(ckpt.get("config") or {})
    class_names = [str(c) for c in ckpt["class_names"]]
    try:
        data_config = dict(ckpt["data_config"])
        image_size = image_size_of(data_config, config)
        for key in ("mean", "std"):
            if len(data_config[key]) != 3:
                raise ValueError(f"data_config {key} must have 3 values")
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: unusable data_config {ckpt['data_config']!r} ({err})") from err
    data_config.setdefault("image_size", image_size)
    try:
        model = create_model(ckpt["model_name"], len(class_names), pretrained=False)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot rebuild model {ckpt['model_name']!r}: {err}") from err
    try:
        model.load_state_dict(ckpt["model"])
    except Exception as err:
        detail = "; ".join(line.strip() for line in str(err).strip().splitlines()[:3] if line.strip())
        raise CheckpointError(f"{path}: weights do not fit model {ckpt['model_name']!r} with "
                              f"{len(class_names)} classes ({detail[:400]})") from err
    channels_last = bool(config.get("channels_last", False))
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.eval()
    meta = {
        "path": str(path),
        "class_names": class_names,
        "model_name": ckpt["model_name"],
        "data_config": data_config,
        "image_size": image_size,
        "channels_last": channels_last,
        "config": config,
        "epoch": ckpt.get("epoch"),
        "best_metric": ckpt.get("best_metric"),
        "device": str(device),
        # the k-NN OOD score's training features (modeling.neighbours), None without
        "feature_bank": ckpt.get("feature_bank"),
        **calibration_fields(ckpt.get("calibration"), ckpt.get("review"), ckpt.get("conformal"), calibrated,
                             ckpt.get("feature_bank") is not None),
    }
    return model, meta


def calibration_fields(calibration: dict | None, review: dict | None, conformal: dict | None, calibrated: bool,
                       knn_available: bool) -> dict[str, Any]:
    """The meta entries that say how probabilities are made: calibration and review (the model's entries),
    calibrated (bool) and temperature (1.0 uncalibrated); the same for a checkpoint and an ONNX file.
    A review that flags by the k-NN score falls back to energy where the model has no feature bank."""
    from bloodcell_lib.modeling.calibration import temperature_of
    from bloodcell_lib.modeling.review import OOD_SCORE, with_score

    if review and review.get("ood_score") == "knn" and not knn_available:
        review = with_score(review, OOD_SCORE)
    return {"calibration": calibration, "calibrated": bool(calibrated and calibration),
            # both thresholds assume calibrated probabilities
            "review": review if calibrated else None, "conformal": conformal if calibrated else None,
            "temperature": temperature_of(calibration) if calibrated else 1.0}


def calibration_note(meta: dict[str, Any]) -> str:
    """One line saying how the probabilities of ``meta``'s model are made."""
    cal = meta.get("calibration")
    if not cal:
        return "uncalibrated: this checkpoint holds no calibration (raw softmax probabilities)"
    if not meta.get("calibrated"):
        return "uncalibrated: raw softmax probabilities (--no-calibration)"
    return (f"calibrated: temperature {cal['temperature']:.3f} fitted on {cal['n']} {cal['fitted_on']} images "
            f"(val ECE {cal['ece_before']:.3f} -> {cal['ece_after']:.3f})")


# --------------------------------------------------------------------------- inference

def _views(x: torch.Tensor, tta: bool) -> Iterable[torch.Tensor]:
    if not tta:
        return (x,)
    from bloodcell_lib.data.transforms import tta_views

    return tta_views(x)


def predict_views(model: torch.nn.Module, meta: dict[str, Any], images_uint8: Any, *,
                  batch_size: int = 64, tta: bool = False) -> np.ndarray:
    """Class probabilities of every test-time view (float32 [V, N, K]) for uint8 images
    [N, 3, S, S]: V = 1 without ``tta``, else the dihedral views of ``transforms.tta_views``.
    View 0 is always the image as given, so one pass yields both the plain and the averaged
    prediction (``evaluate.evaluate_plain_and_tta``). Calibrated: softmax of the logits
    divided by ``meta["temperature"]`` (1.0 when absent).

    Images must have the checkpoint's size (``meta["image_size"]``), as made by
    ``transforms.pil_to_uint8``.
    """
    return probabilities(logit_views(model, meta, images_uint8, batch_size=batch_size, tta=tta), meta)


def probabilities(logits: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """Calibrated softmax (float32) of logits [..., K] with ``meta``'s temperature."""
    from bloodcell_lib.modeling.calibration import softmax

    return softmax(logits, meta.get("temperature", 1.0)).astype(np.float32)


def logit_views(model: torch.nn.Module, meta: dict[str, Any], images_uint8: Any, *,
                batch_size: int = 64, tta: bool = False) -> np.ndarray:
    """Raw logits (float32 [V, N, K]) of every test-time view; as ``predict_views``."""
    return scored_views(model, meta, images_uint8, batch_size=batch_size, tta=tta, with_ood=False)[0]


@torch.inference_mode()
def scored_views(model: torch.nn.Module, meta: dict[str, Any], images_uint8: Any, *,
                 batch_size: int = 64, tta: bool = False, with_ood: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Raw logits (float32 [V, N, K]) and the OOD score (float64 [V, N]) of every view, from
    one pass: the score the review flags use (``ood_score_name``): the k-NN distance in
    feature space when the model carries a feature bank, else the energy of the logits.
    Without ``with_ood`` the score is not computed (NaN): callers that want probabilities only
    (cross-lab scoring, the few-shot study, field typing) skip the feature hook and the k-NN
    search. An ONNX/OpenVINO engine computes its graph's outputs either way."""
    from bloodcell_lib.data.transforms import normalize_batch
    from bloodcell_lib.modeling.neighbours import scored
    from bloodcell_lib.modeling.review import energy_score

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    x_all = torch.as_tensor(images_uint8)
    k = len(meta["class_names"])
    if x_all.ndim != 4 or x_all.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, S, S]; got {tuple(x_all.shape)}")
    if x_all.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (from pil_to_uint8); got {x_all.dtype}")
    size = int(meta["image_size"])
    if tuple(x_all.shape[2:]) != (size, size):
        raise ValueError(f"images are {tuple(x_all.shape[2:])} but the checkpoint expects {size}x{size}")
    n_views = len(list(_views(x_all[:0], tta)))
    logits_out = np.empty((n_views, len(x_all), k), dtype=np.float32)
    ood_out = np.full((n_views, len(x_all)), np.nan, dtype=np.float64)
    if len(x_all) == 0:
        return logits_out, ood_out
    use_knn = with_ood and ood_score_name(meta) == "knn"
    is_module = isinstance(model, torch.nn.Module)  # else an engines.py engine: run(array) -> (logits, knn)
    was_training = model.training if is_module else False
    device = next(model.parameters()).device if is_module else "cpu"
    net = scored(model, meta.get("feature_bank") if use_knn else None) if is_module else None
    try:
        if is_module:
            model.eval()
        for start in range(0, len(x_all), batch_size):
            x = x_all[start:start + batch_size].to(device)
            for v, view in enumerate(_views(x, tta)):
                inp = normalize_batch(view, meta["data_config"], meta.get("channels_last", False))
                if is_module:
                    out = net(inp)
                    logits, knn = (out[0].float().cpu().numpy(), out[1].cpu().numpy()) if use_knn else \
                        (out.float().cpu().numpy(), None)
                else:
                    logits, knn = model.run(inp.contiguous().numpy())
                logits_out[v, start:start + len(x)] = logits
                if with_ood:
                    ood_out[v, start:start + len(x)] = knn if use_knn else energy_score(logits)
    finally:
        if is_module:
            model.train(was_training)
    return logits_out, ood_out


def ood_score_name(meta: dict[str, Any]) -> str:
    """The OOD score of ``meta``'s review flags ("knn" or "energy"; energy without flags)."""
    return (meta.get("review") or {}).get("ood_score", "energy")


def predict_tensors(model: torch.nn.Module, meta: dict[str, Any], images_uint8: Any, *,
                    batch_size: int = 64, tta: bool = False) -> np.ndarray:
    """Class probabilities (float32 [N, K], rows sum to 1) for uint8 images [N, 3, S, S]:
    with ``tta`` the softmax averaged over the views of ``predict_views``."""
    return predict_views(model, meta, images_uint8, batch_size=batch_size, tta=tta).mean(axis=0)


def proba_and_ood(logits: np.ndarray, ood: np.ndarray, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [N, K], OOD score [N]), each averaged over the views, from
    ``scored_views``. Neither score depends on the temperature, so its threshold holds with
    and without calibration."""
    return probabilities(logits, meta).mean(axis=0), np.asarray(ood, dtype=np.float64).mean(axis=0)


def with_review_columns(frame: pd.DataFrame, proba: np.ndarray, ood: np.ndarray, meta: dict[str, Any]) -> pd.DataFrame:
    """``frame`` plus ood_score; with ``meta``'s review thresholds needs_review and
    review_reason; with its conformal entry prediction_set (modeling.conformal)."""
    from bloodcell_lib.modeling.conformal import prediction_sets, set_labels
    from bloodcell_lib.modeling.review import review_flags

    frame = frame.assign(ood_score=np.asarray(ood, dtype=np.float64))
    if meta.get("review"):
        flagged, reasons = review_flags(proba, ood, meta["review"], input_checks(frame, proba, meta))
        frame = frame.assign(needs_review=flagged, review_reason=reasons)
    if meta.get("conformal"):
        frame = frame.assign(prediction_set=set_labels(prediction_sets(proba, meta["conformal"]), proba,
                                                       meta["class_names"]))
    return frame


def input_checks(frame: pd.DataFrame, proba: np.ndarray, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """The review flags read off the pictures themselves (``review.INPUT_CHECKS``), from a
    predictions frame: ``no_cell_found`` where the model needs a nucleus-based crop and none was
    found (``crop`` notes), ``unlike_training_scale`` where a ``crop: window`` model's nucleus
    size lies outside the predicted class's validation range (``nucleus_px``, review ``scale``)."""
    from bloodcell_lib.data.stain import WINDOW_CENTRE
    from bloodcell_lib.modeling.review import NO_CELL, OFF_SCALE, off_scale

    checks = {}
    if "crop" in frame:
        checks[NO_CELL] = frame["crop"].isin([CROP_NOT_FOUND, WINDOW_CENTRE]).to_numpy()
    scale = (meta.get("review") or {}).get("scale")
    if scale and "nucleus_px" in frame:
        checks[OFF_SCALE] = off_scale(proba, frame["nucleus_px"].to_numpy(), scale, meta["class_names"])
    return checks


def unlabelled_review(proba: np.ndarray, ood: np.ndarray, meta: dict[str, Any],
                      checks: dict[str, np.ndarray] | None = None) -> dict[str, Any] | None:
    """What ``meta``'s review flags do on these cells (``review.review_summary`` without
    labels), and with a conformal entry the prediction sets' sizes under ``sets``, counted over
    the cells like the calibration cells only (``n_outside``: the others, for which the
    coverage is not claimed); None when the checkpoint holds no review thresholds."""
    from bloodcell_lib.modeling.conformal import prediction_sets, set_summary
    from bloodcell_lib.modeling.review import review_summary, unlike_calibration

    if not meta.get("review"):
        return None
    summary = review_summary(proba, None, ood, meta["review"], checks)
    if meta.get("conformal"):
        outside = unlike_calibration(ood, meta["review"], checks)
        summary["sets"] = {"alpha": meta["conformal"]["alpha"], "n_outside": int(outside.sum()),
                           **set_summary(prediction_sets(np.asarray(proba)[~outside], meta["conformal"]))}
    return summary


def iter_files(paths: Sequence[str | os.PathLike]) -> Iterator[tuple[str, str | None]]:
    """(file, None) for every file under ``paths`` (folders walked recursively, sorted);
    (path, reason) for a path that does not exist or is not a regular file or folder."""
    seen: set[str] = set()
    for given in paths:
        p = Path(given)
        if p.is_dir():
            found = sorted((f for f in p.rglob("*") if f.is_file()), key=lambda f: str(f))
            if not found:
                yield str(p), "folder holds no files"
            for f in found:
                key = str(f.resolve())
                if key not in seen:
                    seen.add(key)
                    yield str(f), None
        elif p.is_file():
            key = str(p.resolve())
            if key not in seen:
                seen.add(key)
                yield str(p), None
        elif p.exists():
            yield str(p), "not a regular file or folder"
        else:
            yield str(p), "no such file or folder"


CROPPING_MODES = ("stain", "nucleus", "cell", "window")  # training crops that new pictures must get too
CROP_FOUND = "stain (found)"
CROP_NOT_FOUND = "none: no nucleus found"


@dataclass(frozen=True)
class Framed:
    """A picture as the model's input contract frames it: ``image`` (the crop), ``note`` (what
    was done, None for a model trained on whole pictures) and ``nucleus_px`` (``crop: window``:
    the nucleus's longer side in picture pixels, NaN when none was found or not measured)."""

    image: Any
    note: str | None
    nucleus_px: float = float("nan")


def frame_like_training(img: Any, data_config: dict[str, Any]) -> Framed:
    """``crop_like_training`` with the nucleus size a ``crop: window`` model's scale check reads."""
    from bloodcell_lib.data.stain import nucleus_side, window_box

    if data_config.get("crop") == "window":
        window = window_box(img, int(data_config.get("crop_window", 200)))
        return Framed(img if window.box is None else img.crop(window.box), window.note, nucleus_side(window.nucleus))
    return Framed(*crop_like_training(img, data_config))


def crop_like_training(img: Any, data_config: dict[str, Any]) -> tuple[Any, str | None]:
    """(picture, what was done) for a model trained on crops. ``crop: stain`` (and ``nucleus``,
    lobes joined) models get the crop found in the picture; so do ``crop: cell`` models, trained on annotated WBC
    boxes that new pictures do not have (the cell box estimated around the largest nucleus,
    ``nuclei.crop_box``, grown by the checkpoint's margin). Where no nucleus is found the whole picture is
    used and the note says so. ``crop: window`` models get their fixed-pixel square centred on the
    nucleus (``stain.window_box``; the note says how it was placed). Models trained on whole
    pictures: (img, None)."""
    from bloodcell_lib.data.nuclei import crop_box, find_nuclei
    from bloodcell_lib.data.stain import cell_box, window_box

    crop = data_config.get("crop")
    if crop not in CROPPING_MODES:
        return img, None
    if crop == "window":
        window = window_box(img, int(data_config.get("crop_window", 200)))
        return (img if window.box is None else img.crop(window.box)), window.note
    if crop == "cell":  # the annotated box stood round the whole cell: the estimated cell box, as count does
        found = max(find_nuclei(img), key=lambda n: n.area, default=None)
        box = None if found is None else crop_box(found, data_config, img.size)
    else:
        box = cell_box(img, float(data_config.get("crop_margin", 0.15)), crop == "nucleus")
    return (img, CROP_NOT_FOUND) if box is None else (img.crop(box), CROP_FOUND)


def load_framed(path: str, image_size: int,
                data_config: dict[str, Any]) -> tuple[torch.Tensor | None, Framed | None, str | None]:
    """(tensor, Framed, None), or (None, None, reason) for a file that cannot be read: one
    file as the model saw its training pictures (``frame_like_training``)."""
    from bloodcell_lib.data.images import ImageLoadError, load_rgb
    from bloodcell_lib.data.transforms import pil_to_uint8

    try:
        framed = frame_like_training(load_rgb(path), data_config)
        return pil_to_uint8(framed.image, image_size), framed, None
    except ImageLoadError as err:
        return None, None, err.reason
    except Exception as err:  # any other decoder failure is reported, never a crash mid-run
        return None, None, f"cannot be read as an image ({type(err).__name__}: {err})"


def _load_one(path: str, image_size: int,
              data_config: dict[str, Any]) -> tuple[torch.Tensor | None, str | None, str | None]:
    """(tensor, crop note, None), or (None, None, reason): ``load_framed`` without the measurements."""
    tensor, framed, reason = load_framed(path, image_size, data_config)
    return tensor, None if framed is None else framed.note, reason


def _chunks(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _as_loaded(checkpoint_or_loaded: Any, device: str, engine: str | None) -> tuple[Any, dict[str, Any]]:
    if isinstance(checkpoint_or_loaded, (str, os.PathLike)):
        from bloodcell_lib.evaluation.engines import open_engine

        return open_engine(checkpoint_or_loaded, engine, device=device)
    if isinstance(checkpoint_or_loaded, tuple) and len(checkpoint_or_loaded) == 2:
        return checkpoint_or_loaded
    raise TypeError("checkpoint_or_loaded must be a checkpoint path or the (model, meta) pair "
                    "returned by load_checkpoint or engines.open_engine")


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


def predict_images(checkpoint_or_loaded: Any, paths: Sequence[str | os.PathLike] | str | os.PathLike, *,
                   batch_size: int = 64, tta: bool = False, device: str = "cpu",
                   progress: bool = False, engine: str | None = None,
                   decode_threads: int = 2) -> PredictionResult:
    """Classify files and folders (walked recursively, sorted) in batches of ``batch_size``.

    ``checkpoint_or_loaded``: a ``.pt`` checkpoint or exported ``.onnx`` path (run by
    ``engine``, default the fastest installed: ``engines.open_engine``), or the
    ``(model, meta)`` of ``load_checkpoint`` / ``(engine, meta)`` of ``open_engine``.
    Images of any PIL mode are converted by ``images.load_rgb``; files that cannot be
    decoded are returned in ``skipped`` with the reason. ``decode_threads`` files are
    decoded at a time, overlapping inference.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    model, meta = _as_loaded(checkpoint_or_loaded, device, engine)
    size = int(meta["image_size"])
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
            tensor, framed, reason = load_framed(path, size, meta["data_config"])
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
                proba, ood = proba_and_ood(*scored_views(model, meta, torch.stack(tensors), batch_size=batch_size,
                                                         tta=tta), meta)
                probas.append(proba)
                oods.append(ood)
                done_paths.extend(good_paths)
            if bar is not None:
                bar.update(len(decoded))
    if bar is not None:
        bar.close()
    k = len(meta["class_names"])
    proba = np.concatenate(probas) if probas else np.zeros((0, k), dtype=np.float32)
    ood = np.concatenate(oods) if oods else np.zeros(0)
    predictions = prediction_frame(done_paths, proba, meta["class_names"])
    crop_mode = meta["data_config"].get("crop") if meta["data_config"].get("crop") in CROPPING_MODES else None
    if crop_mode is not None:
        predictions.insert(3, "crop", pd.Series(crops, dtype=object))
    if crop_mode == "window":
        predictions.insert(4, "nucleus_px", pd.Series(nucleus_px, dtype=np.float64))
    return PredictionResult(
        predictions=with_review_columns(predictions, proba, ood, meta),
        skipped=pd.DataFrame(skipped, columns=["path", "reason"]),
        seconds=time.perf_counter() - t0,
        review=unlabelled_review(proba, ood, meta, input_checks(predictions, proba, meta)),
        calibration=calibration_note(meta),
        crop=crop_mode,
    )


# --------------------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
    from bloodcell_lib.evaluation.engines import ENGINE_NAMES

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
    from bloodcell_lib.evaluation.engines import EngineError, engine_for_model, open_engine

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
            model, meta = load_checkpoint(args.checkpoint, args.device, calibrated=not args.no_calibration)
        else:
            loaded = open_engine(args.checkpoint, args.engine, device=args.device, calibrated=not args.no_calibration)
    except (CheckpointError, EngineError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from bloodcell_lib.evaluation.adapt_bn import preprocessing_summary
    from bloodcell_lib.evaluation.unlabelled_adapt import adapt_to_folder_by

    if args.adapt:
        try:
            print(adapt_to_folder_by(model, meta, args.adapt, args.adapt_method, batch_size=args.batch_size).summary())
            loaded = engine_for_model(model, meta, args.engine, device=args.device)
        except (ValueError, EngineError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    print(preprocessing_summary(loaded[1]))
    result = predict_images(loaded, args.paths, batch_size=args.batch_size, tta=args.tta,
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
            write_review_page(result.predictions.to_dict("records"), loaded[1]["class_names"], args.html,
                              f"Review {len(result.predictions)} predicted cells")
    except OSError as err:
        print(result.summary())
        print(f"error: cannot write {out}: {err}", file=sys.stderr)
        return 2
    n = len(result.predictions)
    rate = n / result.seconds if result.seconds > 0 else float("nan")
    print(result.summary())
    print(f"wrote {out} ({n} rows, {rate:.1f} img/s, engine {loaded[1]['engine']}{', TTA' if args.tta else ''})"
          + (f" and {skipped_out} ({len(result.skipped)} skipped)" if len(result.skipped) else ""))
    if n == 0:
        reasons = Counter(result.skipped["reason"])
        print("error: no image could be classified" + (f" ({dict(reasons)})" if reasons else ""),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
