"""Score a finished run on one split of its own split.csv, once, after training.

``evaluate_run`` loads the run's ``checkpoint_best.pt`` (chosen on ``val`` during training;
test images are never read before this point), takes the rows of the requested split
(with their crop boxes) from ``split.csv``, decodes them through the same uint8 cache as
training, predicts with ``predict.predict_views`` (the one inference path) and scores
with ``metrics.compute_metrics``. It writes ``predictions_<split>.csv`` and
``metrics_<split>.json`` atomically into the run directory. ``evaluate_plain_and_tta``
scores with and without test-time augmentation from one pass over the images (the plain
prediction is the first test-time view), as the report does.

``evaluate_experiment`` does the same for a cross-validated experiment (``fold_*``
sub-directories): each fold is scored, the predictions are pooled (fold i's test split is
fold i of k, so the pooled predictions are out-of-fold predictions covering every image
once) for one confusion matrix, and the per-fold metrics are summarised as mean and sd.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bloodcell_lib.core.distributed import device_argument, resolve_device
from bloodcell_lib.data.splits import BOX_COLUMNS
from bloodcell_lib.modeling.loaded import LoadedModel, load_checkpoint
from bloodcell_lib.modeling.rundir import KEPT_CHECKPOINT, RunDir, fold_dirs


@dataclass
class EvaluationResult:
    """``predictions``: path, label, predicted, confidence, prob_<class>..., xmin..ymax (crop
    box, empty when none) [, fold]; ``metrics``: compute_metrics' dict plus run context;
    ``failed``: path, reason of images that could not be decoded (left out of the scores);
    ``folds``: per-fold results of a cross-validated experiment; ``files``: what was written."""

    predictions: pd.DataFrame
    metrics: dict[str, Any]
    failed: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["path", "reason"]))
    folds: list["EvaluationResult"] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def class_names(self) -> list[str]:
        return list(self.metrics["class_names"])

    @property
    def proba(self) -> np.ndarray:
        return self.predictions[[f"prob_{c}" for c in self.class_names]].to_numpy()

    @property
    def y_true(self) -> np.ndarray:
        from bloodcell_lib.evaluation.metrics import label_indices

        return label_indices(self.predictions["label"].astype(str), self.class_names)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _box_frame(boxes: pd.Series) -> pd.DataFrame:
    return pd.DataFrame([tuple(b) if b is not None and not (isinstance(b, float) and np.isnan(b)) else (None,) * 4
                         for b in boxes], columns=BOX_COLUMNS, index=boxes.index, dtype="Float64")


def evaluate_run(run_dir: str | os.PathLike, *, split: str = "test", tta: bool | None = None,
                 tag: str | None = None, **kwargs: Any) -> EvaluationResult:
    """Score ``run_dir/checkpoint`` on the ``split`` rows of ``run_dir/split.csv``.

    ``tta``: None uses the run config's ``tta``; True/False overrides it. ``tag`` adds a
    suffix to the written files (``predictions_test_tta.csv``) so variants do not overwrite
    each other. Other keywords: those of ``evaluate_run_variants``.
    """
    return evaluate_run_variants(run_dir, {tag: tta}, split=split, **kwargs)[tag]


def _resolve_variants(variants: dict[str | None, bool | None], loaded: LoadedModel) -> dict[str | None, bool]:
    default = bool(loaded.config.get("tta", False))
    return {tag: default if tta is None else bool(tta) for tag, tta in variants.items()}


def evaluate_run_variants(run_dir: str | os.PathLike, variants: dict[str | None, bool | None], *,
                          split: str = "test", batch_size: int = 64, checkpoint: str = KEPT_CHECKPOINT,
                          device: str = "auto", loaded: LoadedModel | None = None,
                          cache_dir: str | os.PathLike | None = None, num_workers: int = 2,
                          progress: bool = False, write: bool = True) -> dict[str | None, EvaluationResult]:
    """Score ``run_dir/checkpoint`` on the ``split`` rows of ``run_dir/split.csv`` once per
    variant: ``variants`` maps a file tag (None: no suffix) to its ``tta`` (None: the run
    config's). The images are decoded and passed through the model once for all variants:
    the plain prediction is view 0 of the test-time views (``predict.predict_views``).

    ``loaded``: the checkpoint already loaded (``modeling.loaded.load_checkpoint``). Images that
    cannot be decoded are left out of the scores and listed in ``failed`` and in
    ``metrics["failed"]``. Raises FileNotFoundError / ValueError / predict.CheckpointError
    naming the file for a missing or unusable run directory.
    """
    from bloodcell_lib.data import cache, splits
    from bloodcell_lib.evaluation.predict import scored_views

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    split_file = RunDir(run_dir).split
    if not split_file.is_file():
        raise FileNotFoundError(f"{split_file} does not exist; is {run_dir} a finished run directory?")
    ckpt_path = run_dir / checkpoint
    loaded = loaded if loaded is not None else load_checkpoint(ckpt_path, str(resolve_device(device)))
    class_names = list(loaded.class_names)
    table = splits.load_split(split_file)
    rows = table[table["split"].astype(str) == split].reset_index(drop=True)
    if rows.empty:
        present = sorted(set(table["split"].astype(str)) - {""})
        raise ValueError(f"{split_file} has no rows of split {split!r}; splits present: {', '.join(present) or 'none'}")
    unknown = sorted(set(rows["label"].astype(str)) - set(class_names))
    if unknown:
        raise ValueError(f"{split_file}: label(s) {unknown} of split {split!r} are not among the checkpoint's "
                         f"classes {class_names}")
    resolved = _resolve_variants(variants, loaded)

    t0 = time.perf_counter()
    cached = cache.load_or_build_cache(rows, loaded.image_size, cache_dir=cache_dir,
                                       num_workers=num_workers, progress=progress)
    decode_seconds = time.perf_counter() - t0
    ok = np.asarray(cached.ok, dtype=bool)
    failed = pd.DataFrame([(str(p), str(r)) for p, r in cached.failed], columns=["path", "reason"])
    if len(failed):
        _log(f"WARNING: {len(failed)} image(s) of split {split!r} could not be decoded and are NOT scored:")
        for row in failed.head(20).itertuples(index=False):
            _log(f"  - {row.path}: {row.reason}")
        if len(failed) > 20:
            _log(f"  ... and {len(failed) - 20} more (all in metrics['failed'])")
    scored = rows[ok].reset_index(drop=True)
    if scored.empty:
        raise ValueError(f"none of the {len(rows)} image(s) of split {split!r} in {split_file} could be decoded")
    images = cached.images[np.flatnonzero(ok)] if not ok.all() else cached.images

    t1 = time.perf_counter()
    logits, ood = scored_views(loaded, images, batch_size=batch_size, tta=any(resolved.values()))
    predict_seconds = time.perf_counter() - t1

    # what every variant's metrics share: the run, the checkpoint and the one pass's timing
    context = {
        "split": split,
        "run_dir": str(run_dir),
        "checkpoint": str(ckpt_path),
        "checkpoint_epoch": loaded.epoch,
        "checkpoint_best_metric": loaded.best_metric,
        "monitor": loaded.config.get("monitor"),
        "model_name": loaded.model_name,
        "image_size": loaded.image_size,
        "n_rows": int(len(rows)),
        "n_failed": int(len(failed)),
        "failed": failed.to_dict("records"),
        "decode_seconds": round(decode_seconds, 3),
        "predict_seconds": round(predict_seconds, 3),
        "views_predicted": int(len(logits)),
        "images_per_second": round(len(scored) / predict_seconds, 2) if predict_seconds > 0 else None,
    }
    results = {}
    for tag, use_tta in resolved.items():
        views = len(logits) if use_tta else 1
        result = _scored_result(scored, logits[:views], ood[:views], loaded, {**context, "tta": use_tta}, failed)
        if write:
            _write(result, run_dir, split, tag)
        results[tag] = result
    return results


def _scored_result(scored: pd.DataFrame, logits: np.ndarray, ood: np.ndarray, loaded: LoadedModel,
                   context: dict[str, Any], failed: pd.DataFrame) -> EvaluationResult:
    """Scores of the (calibrated) probabilities averaged over the logit views [V, N, K]
    (and the OOD scores [V, N]);
    ``metrics["calibration"]`` says how they were made and what the raw softmax scored,
    ``metrics["review"]`` what the checkpoint's review flags do on these images."""
    from bloodcell_lib.evaluation.metrics import compute_metrics, label_indices
    from bloodcell_lib.evaluation.predict import prediction_frame, proba_and_ood, with_review_columns
    from bloodcell_lib.modeling.calibration import ece_floor
    from bloodcell_lib.modeling.conformal import prediction_sets, set_summary
    from bloodcell_lib.modeling.review import accuracy_at_coverage, review_summary

    class_names = list(loaded.class_names)
    proba, ood = proba_and_ood(logits, ood, loaded)
    pred = with_review_columns(prediction_frame(list(scored["path"].astype(str)), proba, class_names), proba, ood,
                               loaded)
    predictions = pd.concat([pred.iloc[:, :1], scored["label"].astype(str).rename("label"), pred.iloc[:, 1:],
                             _box_frame(scored["box"])], axis=1)
    labels = scored["label"].astype(str).tolist()
    metrics = compute_metrics(labels, proba, class_names)
    raw = compute_metrics(labels, replace(loaded, temperature=1.0).probabilities(logits).mean(axis=0), class_names)
    metrics["calibration"] = {**(loaded.calibration or {"method": "none"}), "applied": bool(loaded.calibrated),
                              "ece_floor": ece_floor(proba),
                              "uncalibrated": {"ece": raw["ece"], "log_loss": raw["log_loss"],
                                               "reliability": raw["reliability"]}}
    indices = label_indices(labels, class_names)
    if loaded.review:
        metrics["review"] = {**review_summary(proba, indices, ood, loaded.review),
                             # the same question at a fixed coverage: the test curve's point
                             "accuracy_at_95_coverage": accuracy_at_coverage(proba.max(axis=1),
                                                                             proba.argmax(axis=1) == indices),
                             "thresholds": {k: loaded.review[k] for k in ("target_error", "confidence_threshold",
                                                                          "ood_score", "ood_threshold")}}
    if loaded.conformal:
        sets = prediction_sets(proba, loaded.conformal)
        metrics["conformal"] = {"method": loaded.conformal["method"], "alpha": loaded.conformal["alpha"],
                                "qhat": loaded.conformal["qhat"], "n_val": loaded.conformal["n"],
                                **set_summary(sets, indices)}
    held_out = (loaded.config or {}).get("test_source")
    if held_out:
        metrics["held_out_lab"] = _held_out_lab_score(proba, class_names, labels, held_out)
    metrics.update(context)
    return EvaluationResult(predictions=predictions, metrics=metrics, failed=failed)


def _held_out_lab_score(proba: np.ndarray, class_names: list[str], labels: list[str], source: str) -> dict[str, Any]:
    """A leave-one-lab-out run's test split (all of its held-out lab ``source``) scored as the
    cross-lab scores are (``crosslab.score_restricted``): over the classes the lab has at least
    ``MIN_CLASS_CELLS`` cells of, each class left out named with its count and the reason."""
    from bloodcell_lib.data.sources import MIN_CLASS_CELLS
    from bloodcell_lib.evaluation.crosslab import score_restricted

    score = score_restricted(proba, class_names, labels, min_class_cells=MIN_CLASS_CELLS)
    reason = (f"fewer than {MIN_CLASS_CELLS} cells in the held-out lab: one or two cells decide a class's recall"
              if score["classes_left_out"] else None)
    return {"test_source": source, "why_left_out": reason,
            **{key: score[key] for key in ("min_class_cells", "classes_left_out", "classes", "n", "accuracy",
                                           "balanced_accuracy", "macro_f1", "per_class_recall")}}


def _write(result: EvaluationResult, run_dir: Path, split: str, tag: str | None) -> None:
    from bloodcell_lib.core.fileio import atomic_write_json, atomic_write_text

    files = RunDir(run_dir)
    result.files["predictions"] = atomic_write_text(files.predictions(split, tag), result.predictions.to_csv(index=False))
    result.files["metrics"] = atomic_write_json(files.metrics(split, tag), result.metrics)


def evaluate_experiment(run_dir: str | os.PathLike, *, split: str = "test", tta: bool | None = None,
                        tag: str | None = None, **kwargs: Any) -> EvaluationResult:
    """A single run (``evaluate_run``), or, when ``run_dir`` holds ``fold_*`` runs, every fold:
    ``evaluate_experiment_variants`` with one variant."""
    return evaluate_experiment_variants(run_dir, {tag: tta}, split=split, **kwargs)[tag]


def evaluate_plain_and_tta(run_dir: str | os.PathLike, *, split: str = "test",
                           **kwargs: Any) -> tuple[EvaluationResult, EvaluationResult]:
    """(without, with test-time augmentation), from one pass over the images; files as
    ``evaluate_experiment(tta=False)`` and ``evaluate_experiment(tta=True, tag="tta")``."""
    results = evaluate_experiment_variants(run_dir, {None: False, "tta": True}, split=split, **kwargs)
    return results[None], results["tta"]


def evaluate_experiment_variants(run_dir: str | os.PathLike, variants: dict[str | None, bool | None], *,
                                 split: str = "test", write: bool = True,
                                 **kwargs: Any) -> dict[str | None, EvaluationResult]:
    """``evaluate_run_variants`` of a single run, or of every ``fold_*`` run of a
    cross-validated experiment.

    For folds each variant's result holds the pooled predictions (column ``fold``), metrics
    of the pooled predictions (confusion matrix, per class, reliability, ... over all folds)
    plus ``metrics["cv"]`` = ``summarize_folds`` (mean and sd of each fold's scalar metrics),
    ``metrics["pooling"]`` ("out-of-fold" when the folds' test images are disjoint), and
    ``folds`` (each fold's EvaluationResult). Files are written per fold and, pooled, into
    ``run_dir``.
    """
    from bloodcell_lib.evaluation.metrics import compute_metrics, summarize_folds
    from bloodcell_lib.modeling.calibration import ece_floor
    from bloodcell_lib.modeling.conformal import pooled_set_summary

    run_dir = Path(run_dir)
    folds = fold_dirs(run_dir)
    if not folds:
        return evaluate_run_variants(run_dir, variants, split=split, write=write, **kwargs)
    checkpoint = kwargs.get("checkpoint", KEPT_CHECKPOINT)
    incomplete = [str(f) for f in folds if not (f / checkpoint).is_file() or not RunDir(f).split.is_file()]
    if incomplete:
        raise FileNotFoundError(f"cross-validation in {run_dir} is incomplete: no {checkpoint} or {RunDir.SPLIT} in "
                                + ", ".join(incomplete) + " (finish training, e.g. with resume: true)")
    per_fold = []
    for i, fold in enumerate(folds):
        _log(f"evaluating {fold.name} ({i + 1}/{len(folds)}) on split {split!r}")
        per_fold.append(evaluate_run_variants(fold, variants, split=split, write=write, **kwargs))
    pooled = {}
    for tag in variants:
        results = [fold_results[tag] for fold_results in per_fold]
        class_names = results[0].class_names
        for fold, res in zip(folds, results):
            if res.class_names != class_names:
                raise ValueError(f"{fold}: classes {res.class_names} differ from {folds[0]}: {class_names}")
        predictions = pd.concat([r.predictions.assign(fold=int(f.name.split("_")[1])) for f, r in zip(folds, results)],
                                ignore_index=True)
        failed = pd.concat([r.failed for r in results], ignore_index=True)
        path_sets = [set(r.predictions["path"]) for r in results]
        disjoint = sum(len(s) for s in path_sets) == len(set().union(*path_sets))
        metrics = compute_metrics(predictions["label"].tolist(),
                                  predictions[[f"prob_{c}" for c in class_names]].to_numpy(), class_names)
        metrics.update({
            "split": split,
            "run_dir": str(run_dir),
            "n_folds": len(folds),
            "pooling": ("out-of-fold: each image scored once, by the fold model that did not train on it"
                        if disjoint else "stacked: some images were scored by several fold models"),
            "cv": summarize_folds([r.metrics for r in results]),
            "tta": results[0].metrics["tta"],
            "model_name": results[0].metrics.get("model_name"),
            "image_size": results[0].metrics.get("image_size"),
            "n_failed": int(len(failed)),
            "failed": failed.to_dict("records"),
            "folds": [{key: r.metrics.get(key) for key in ("run_dir", "n", "accuracy", "balanced_accuracy",
                                                           "macro_f1", "roc_auc_ovr", "log_loss", "ece",
                                                           "checkpoint_epoch")}
                      for r in results],
        })
        fold_cals = [r.metrics.get("calibration") or {} for r in results]
        metrics["calibration"] = {"method": "per fold", "applied": all(c.get("applied") for c in fold_cals),
                                  "temperatures": [c.get("temperature") for c in fold_cals],
                                  "ece_floor": ece_floor(predictions[[f"prob_{c}" for c in class_names]].to_numpy())}
        if all("conformal" in r.metrics for r in results):  # each fold's own sets, pooled
            metrics["conformal"] = pooled_set_summary([r.metrics["conformal"] for r in results])
        result = EvaluationResult(predictions=predictions, metrics=metrics, failed=failed, folds=results)
        if write:
            _write(result, run_dir, split, tag)
        pooled[tag] = result
    return pooled


def main(argv: list[str]) -> int:
    """``bloodcell evaluate RUN_DIR``: ``evaluate_experiment`` on the run's own split, files
    written into the run folder, the headline scores printed."""
    import argparse

    from bloodcell_lib.modeling.checkpoint import CheckpointError

    parser = argparse.ArgumentParser(prog="bloodcell evaluate",
                                     description="Score a finished run folder (or cross-validated experiment) on "
                                                 "one split of its split.csv; writes predictions_<split>.csv and "
                                                 "metrics_<split>.json into it.")
    parser.add_argument("run_dir", help="the run folder (holds split.csv and checkpoint_best.pt, or fold_* runs)")
    parser.add_argument("--split", default="test", help="split of split.csv to score (default test)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="test-time augmentation (default: the run config's tta)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--device", default="auto", type=device_argument,
                        help="auto (default: cuda where torch sees a GPU, else cpu), cpu or cuda")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: 0 for --help, 2 for bad arguments
        return int(exit_.code or 0)
    try:
        result = evaluate_experiment(args.run_dir, split=args.split, tta=args.tta, batch_size=args.batch_size,
                                     device=args.device, progress=True)
    except (FileNotFoundError, ValueError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    m = result.metrics
    print(f"{args.run_dir} split {args.split!r}: n={m['n']} accuracy={m['accuracy']:.4f} "
          f"balanced_accuracy={m['balanced_accuracy']:.4f} macro_f1={m['macro_f1']:.4f} (tta={m['tta']})")
    print(f"wrote {result.files['metrics']} and {result.files['predictions']}")
    return 0
