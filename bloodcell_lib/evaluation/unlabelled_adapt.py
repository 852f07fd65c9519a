"""Adapting a model to a lab on its unlabelled cells: ``predict --adapt FOLDER [--adapt-method M]``
and ``count --adapt FOLDER [--adapt-method M]``.

Methods (the model-level math and each paper's settings are in ``modeling.adaptation``):

- ``adabn``: BatchNorm statistics re-estimated on the lab's cells (Li et al. 2016);
- ``adabn-balanced``: the same with every cell weighted so that each class the unadapted
  model answers counts equally (a lab's class mix does not set the statistics);
- ``t3a``: AdaBN, then T3A's prototype classifier (Iwasawa & Matsuo, NeurIPS 2021) replaces
  the head's weights;
- ``shot``: AdaBN, then SHOT-IM (Liang et al., ICML 2020) fine-tunes the BatchNorm affine
  weights and the last feature stages (head frozen) by information maximisation plus
  clustered pseudo-labels, cells unlike the training cells (k-NN score above the review
  threshold) left out of the pseudo-labels; the BatchNorm statistics re-estimated last.

No method reads a label: they get pictures only. Safeguards: with fewer than ``MIN_CELLS``
readable cells nothing is adapted; when the adapted answers on the lab's cells collapse onto
one or two classes where the unadapted answers did not (``adaptation.collapse_reason``) the
unadapted model is restored. Either way the summary says which model's answers are used.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from bloodcell_lib.evaluation.features import logits_features
from bloodcell_lib.modeling import adaptation as ada
from bloodcell_lib.modeling.loaded import LoadedModel

METHODS = ("adabn", "adabn-balanced", "t3a", "shot")
# The default of --adapt until the held-out-lab rows are measured (docs/adapting.md: the rule).
DEFAULT_METHOD = "adabn"
MIN_CELLS = 20
ADAPTED, UNADAPTED = "adapted", "unadapted"


@dataclass
class UnlabelledAdaptation:
    """What ``adapt_unlabelled`` did: ``method``, ``source`` (the folder), ``n_cells`` read,
    ``kept`` (ADAPTED or UNADAPTED: whose answers the model now gives), ``what`` (one sentence),
    ``notes``, ``seconds`` and ``skipped`` (path, reason) for files that could not be used."""

    method: str
    source: str
    n_cells: int
    kept: str
    what: str
    seconds: float
    notes: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        head = (f"adaptation ({self.method}) on {self.n_cells} unlabelled cell(s) from {self.source} in "
                f"{self.seconds:.1f} s: {self.what}" if self.kept == ADAPTED else
                f"adaptation ({self.method}) not applied ({self.seconds:.1f} s): {self.what}; the UNADAPTED "
                "model's answers are used")
        lines = [head, *(f"  {note}" for note in self.notes)]
        lines += [f"  adaptation skipped {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


def _shares(predicted: torch.Tensor, class_names: list[str]) -> str:
    counts = Counter(predicted.tolist())
    return ", ".join(f"{class_names[c]} {n / len(predicted):.0%}" for c, n in sorted(counts.items()))


def _adabn(loaded, images, before, features, batch_size) -> tuple[str, list[str]]:
    done = ada.adapt_batchnorm(loaded, images, batch_size=max(2, batch_size))
    return f"BatchNorm statistics of {done['n_layers']} layer(s) re-estimated", []


def _adabn_balanced(loaded, images, before, features, batch_size) -> tuple[str, list[str]]:
    pseudo = before.argmax(1)
    weights = ada.balanced_weights(pseudo, len(loaded.class_names))
    done = ada.adapt_batchnorm_weighted(loaded, images, weights, batch_size=max(2, batch_size))
    return (f"BatchNorm statistics of {done['n_layers']} layer(s) re-estimated, each class of the unadapted "
            "model's answers weighted equally",
            [f"unadapted answers (the weights' classes): {_shares(pseudo, loaded.class_names)}"])


def _t3a(loaded, images, before, features, batch_size) -> tuple[str, list[str]]:
    from bloodcell_lib.modeling.models import head_name

    what, _ = _adabn(loaded, images, before, features, batch_size)
    logits, adapted = logits_features(loaded, images, batch_size=batch_size)
    model = loaded.model
    prototypes = ada.t3a_weights(adapted, torch.as_tensor(logits), model.get_submodule(head_name(model)))
    ada.set_head(model, prototypes)
    notes = ["T3A logits are feature norm x cosine similarity to the prototypes: the checkpoint's temperature was "
             "fitted for its own head, so confidences (and review flags) are not calibrated"] \
        if loaded.calibrated else []
    return (f"{what}, then the classifier replaced by T3A prototypes (the {ada.T3A_FILTER_M} lowest-entropy "
            "supports per class)", notes)


def _shot(loaded, images, before, features, batch_size) -> tuple[str, list[str]]:
    from bloodcell_lib.modeling.neighbours import knn_distance, normalise

    bank, review = loaded.feature_bank, loaded.review or {}
    threshold = (review.get("ood_thresholds") or {}).get("knn")
    if bank is not None and threshold is not None:
        bank_features = normalise(bank["features"].float().cpu())
        score = knn_distance(features, bank_features, min(int(bank["k"]), len(bank_features)))
        mask = score <= threshold
        notes = [f"{int((~mask).sum())} cell(s) with a k-NN score above the review threshold {threshold:.3f} "
                 "left out of the pseudo-labels"]
    else:
        mask = torch.ones(len(images), dtype=torch.bool)
        notes = ["no k-NN feature bank and threshold in the checkpoint (or --no-calibration): every cell takes "
                 "part in the pseudo-labels"]
    ada.adapt_batchnorm(loaded, images, batch_size=max(2, batch_size))
    history = ada.shot_im(loaded, images, lambda: logits_features(loaded, images, batch_size=batch_size),
                          pseudo_mask=mask)
    done = ada.adapt_batchnorm(loaded, images, batch_size=max(2, batch_size))
    notes.append("loss per epoch: " + ", ".join(f"{h['loss']:.3f}" for h in history))
    return (f"AdaBN, then SHOT-IM ({ada.SHOT_EPOCHS} epoch(s), SGD lr {ada.SHOT_LR:g}, beta {ada.SHOT_BETA:g}; "
            f"BatchNorm affine + last {ada.SHOT_STAGES} stage(s) trained, head frozen), BatchNorm statistics of "
            f"{done['n_layers']} layer(s) re-estimated after", notes)


_METHODS: dict[str, Callable] = {"adabn": _adabn, "adabn-balanced": _adabn_balanced, "t3a": _t3a, "shot": _shot}


def in_pixel_order(images_uint8: torch.Tensor) -> torch.Tensor:
    """The cells sorted by a hash of their pixels: the batches every method forms (and so its
    result) depend on the pictures alone, never on their file names or folders."""
    keys = [hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest() for image in images_uint8]
    return images_uint8[torch.as_tensor(sorted(range(len(keys)), key=keys.__getitem__), dtype=torch.long)]


def adapt_unlabelled(loaded: LoadedModel, images_uint8: torch.Tensor,
                     method: str = DEFAULT_METHOD, *, source: str = "the given cells",
                     batch_size: int = 64) -> UnlabelledAdaptation:
    """Adapt ``loaded.model`` (in place) to uint8 cells [N, 3, S, S] of one lab by ``method``, or
    leave it unchanged (too few cells, or the collapse guard); pictures only, no label."""
    if method not in _METHODS:
        raise ValueError(f"adaptation method {method!r} is not known; use one of: {', '.join(METHODS)}")
    started = time.perf_counter()
    n = len(images_uint8)

    def result(kept: str, what: str, notes: list[str]) -> UnlabelledAdaptation:
        return UnlabelledAdaptation(method, str(source), n, kept, what, time.perf_counter() - started, notes)

    if n < MIN_CELLS:
        return result(UNADAPTED, f"only {n} readable cell(s) in {source}, at least {MIN_CELLS} needed", [])
    images_uint8 = in_pixel_order(images_uint8)
    parent = {name: value.clone() for name, value in loaded.model.state_dict().items()}
    before, features = logits_features(loaded, images_uint8, batch_size=batch_size)
    before = torch.as_tensor(before)
    what, notes = _METHODS[method](loaded, images_uint8, before, features, batch_size)
    after = torch.as_tensor(logits_features(loaded, images_uint8, batch_size=batch_size)[0])
    reason = ada.collapse_reason(before.argmax(1), after.argmax(1), len(loaded.class_names))
    if reason is not None:
        loaded.model.load_state_dict(parent)
        return result(UNADAPTED, f"WARNING: the adapted answers collapsed ({reason}: "
                                 f"{_shares(after.argmax(1), loaded.class_names)})", notes)
    return result(ADAPTED, what, notes)


def adapt_to_folder_by(loaded: LoadedModel, folder: str | os.PathLike,
                       method: str = DEFAULT_METHOD, *, batch_size: int = 64) -> UnlabelledAdaptation:
    """``adapt_unlabelled`` on every picture under ``folder``, read as ``predict`` reads pictures."""
    from bloodcell_lib.evaluation.adapt_bn import load_folder_images

    images, _, skipped = load_folder_images(folder, loaded)
    done = adapt_unlabelled(loaded, images, method, source=str(folder), batch_size=batch_size)
    done.skipped = skipped
    return done
