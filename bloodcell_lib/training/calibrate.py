"""After training: calibrate the kept checkpoint on the run's validation images.

``calibrate_run`` computes the validation logits of ``checkpoint_best.pt`` (the same
uint8 cache and model input as training's validation pass), fits the temperature
(``modeling.calibration``) and the review thresholds (``modeling.review``) on them, and
rewrites ``checkpoint_best.pt`` atomically with four more keys, ``calibration``,
``review``, ``conformal`` (the prediction sets' threshold, ``modeling.conformal``) and
``feature_bank`` (the features of a class-balanced sample of training cells, for the k-NN
out-of-distribution score of ``modeling.neighbours``). Only ``split == "val"``
rows choose anything, and the bank reads only ``split == "train"`` rows: test images never
steer calibration or thresholds. A cross-validated experiment calibrates each fold on that fold's val part
(``fit`` runs once per fold).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bloodcell_lib.modeling import calibration, conformal, neighbours, review
from bloodcell_lib.modeling.checkpoint import read_checkpoint, save_checkpoint
from bloodcell_lib.modeling.rundir import RunDir
from bloodcell_lib.training.console import log
from bloodcell_lib.training.data_loading import Batches, to_model_input

# Below this many validation images a fitted T and a 0.5 %-error threshold rest on a
# handful of mistakes; the run log says so (BCCD's 5 % val part is about 500 images).
FEW_VAL_IMAGES = 500


def _split_images(run_dir: Path, cfg: dict[str, Any], class_names: list[str]
                  ) -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    """uint8 images and class indices of the run's train and val rows, from its split.csv;
    rows that cannot be decoded are left out (training already listed them in run_info.json)."""
    from bloodcell_lib.data import cache, splits

    table = splits.load_split(run_dir / "split.csv")
    # train + val in the order training cached them: the same cache file, no second decode
    used = table[table["split"].isin(["train", "val"])].reset_index(drop=True)
    size = int(cfg["image_size"])
    if cfg.get("use_cache", True):
        cached = cache.load_or_build_cache(used, size, progress=False)
    else:
        with tempfile.TemporaryDirectory(prefix="bloodcell-calibrate-") as tmp:
            cached = cache.load_or_build_cache(used, size, cache_dir=tmp, progress=False)
            cached.images = cached.images.clone()
    index = {name: i for i, name in enumerate(class_names)}
    out = {}
    for split in ("train", "val"):
        rows = (used["split"] == split).to_numpy() & cached.ok.bool().numpy()
        labels = np.array([index[label] for label in used["label"][rows]], dtype=np.int64)
        out[split] = cached.images[torch.from_numpy(rows)], labels
    return out


@torch.no_grad()
def _logits_and_features(model: torch.nn.Module, images: torch.Tensor, ckpt: dict[str, Any],
                         device: torch.device) -> tuple[np.ndarray, torch.Tensor]:
    model.eval()
    channels_last = bool(ckpt["config"].get("channels_last"))
    batches = Batches(images, torch.zeros(len(images), dtype=torch.long), torch.arange(len(images)), 128)
    pairs = [neighbours.logits_and_features(model, to_model_input(x, device, ckpt["data_config"], channels_last))
             for x, _ in batches]
    return (torch.cat([p[0].float().cpu() for p in pairs]).numpy(),
            torch.cat([p[1].float().cpu() for p in pairs]))


def _class_counts(labels: np.ndarray, class_names: list[str]) -> dict[str, int]:
    return {name: int(n) for name, n in zip(class_names, np.bincount(labels, minlength=len(class_names)))}


def calibrate_checkpoint(ckpt: dict[str, Any], logits: np.ndarray, labels: np.ndarray, *,
                         features: torch.Tensor | None = None, bank: dict[str, Any] | None = None
                         ) -> dict[str, Any]:
    """``ckpt`` with ``calibration``, ``review`` and ``conformal`` entries fitted on validation logits (and,
    with a ``bank`` of training features and the validation ``features``, the k-NN score's
    threshold besides energy's), plus ``feature_bank`` when given."""
    entry = calibration.temperature_entry(logits, labels)
    proba = calibration.softmax(logits, entry["temperature"])
    ood = {review.OOD_SCORE: review.energy_score(logits)}
    if bank is not None:
        ood[bank["score"]] = neighbours.knn_distance(features, bank["features"].float(), bank["k"]).numpy()
    calibrated = {**ckpt, "calibration": entry, "review": review.review_entry(proba, labels, ood),
                  "conformal": conformal.conformal_entry(proba, labels)}
    if bank is not None:
        calibrated["feature_bank"] = bank
    return calibrated


def _val_scale(run_dir: Path, class_names: list[str]) -> dict[str, Any]:
    """``review.scale_entry`` of the run's validation pictures (their nucleus sizes, read off the
    original files: a ``crop: window`` model sees cells at the picture's own pixel scale)."""
    from bloodcell_lib.data import splits
    from bloodcell_lib.data.stain import nucleus_sides

    table = splits.load_split(run_dir / "split.csv")
    val = table[table["split"] == "val"]
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.array([index.get(label, -1) for label in val["label"]], dtype=np.int64)
    return review.scale_entry(np.array(nucleus_sides(val["path"].tolist())), labels, class_names)


def calibrate_run(run_dir: str | Path, device: torch.device | str = "cpu") -> dict[str, Any] | None:
    """Fit calibration, review thresholds and prediction sets on the run's val images into its
    checkpoint_best.pt (rank 0 only; None elsewhere). Returns the three new entries."""
    from bloodcell_lib.core import distributed as D
    from bloodcell_lib.modeling.models import create_model

    if not D.is_main():
        return None
    run_dir, device = Path(run_dir), torch.device(device)
    path = RunDir(run_dir).checkpoint_best
    if not path.is_file():
        log(f"calibration: no {path}; nothing to calibrate")
        return None
    ckpt = read_checkpoint(path)
    class_names = list(ckpt["class_names"])
    splits = _split_images(run_dir, ckpt["config"], class_names)
    images, labels = splits["val"]
    if len(labels) == 0:
        log(f"calibration: no decodable validation image in {run_dir}; {path.name} stays uncalibrated")
        return None
    model = create_model(ckpt["model_name"], len(ckpt["class_names"]), pretrained=False)
    model.load_state_dict(ckpt["model"])
    model = model.to(device)
    logits, features = _logits_and_features(model, images, ckpt, device)
    bank = None
    train_images, train_labels = splits["train"]
    if len(train_labels) >= neighbours.NEIGHBOURS:
        rows = torch.from_numpy(neighbours.bank_rows(train_labels, seed=int(ckpt["config"].get("seed", 0))))
        bank = neighbours.bank_entry(_logits_and_features(model, train_images[rows], ckpt, device)[1],
                                     _class_counts(train_labels[rows.numpy()], class_names))
    calibrated = calibrate_checkpoint(ckpt, logits, labels, features=features, bank=bank)
    if ckpt["data_config"].get("crop") == "window":
        calibrated["review"]["scale"] = _val_scale(run_dir, class_names)
    save_checkpoint(calibrated, path)
    cal, rev, sets = calibrated["calibration"], calibrated["review"], calibrated["conformal"]
    log(f"calibration on {cal['n']} val images: temperature {cal['temperature']:.3f}, "
        f"ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f}; review below confidence "
        f"{rev['confidence_threshold']:.4f} (target <= {rev['target_error']:.1%} errors among accepted: "
        f"val coverage {rev['val']['coverage']:.3f}) or {rev['ood_score']} above {rev['ood_threshold']:.3f}"
        + (f" (k-NN bank of {len(bank['features'])} training cells)" if bank else "")
        + f"; {1 - sets['alpha']:.0%} prediction sets: classes with p >= {1 - sets['qhat']:.4f} "
        f"(val mean size {sets['val']['mean_size']:.2f})")
    if cal["n"] < FEW_VAL_IMAGES:
        log(f"WARNING: calibration rests on only {cal['n']} validation images; temperature and "
            "thresholds are rough")
    return {"calibration": cal, "review": rev, "conformal": sets}
