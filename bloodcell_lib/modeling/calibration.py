"""Temperature scaling: one scalar T fitted on validation logits, so that softmax(z / T)
means what it says (Guo et al. 2017, "On calibration of modern neural networks").

Label smoothing makes these models under-confident (PBC: 99 % right at mean confidence
0.90); a T below 1 sharpens them. T is fitted by L-BFGS on the negative log-likelihood of
the validation logits only, and stored in the checkpoint's ``calibration`` entry:
{"method": "temperature", "temperature", "fitted_on": "val", "n", "ece_before",
"ece_after"} (ECE on those validation images).

A single T never changes which class wins, so accuracy is untouched.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

ECE_BINS = 15  # as evaluation.metrics, so the numbers compare
# T is searched as exp(log_t) within these bounds: beyond them a fit on a few hundred
# images is chasing noise (T -> 0 when validation holds no error at all).
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature (float64, numerically stable)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def ece(proba: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of the max probability over equal-width bins (0, 1]."""
    proba, labels = np.asarray(proba, dtype=np.float64), np.asarray(labels)
    if len(labels) == 0:
        return float("nan")
    confidence = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == labels).astype(np.float64)
    # bin i holds (i/n, (i+1)/n]; a confidence of 0 joins the first bin
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        inside = bins == b
        total += inside.sum() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total / len(labels))


def ece_floor(proba: np.ndarray, draws: int = 200, seed: int = 0) -> dict[str, float]:
    """What ECE a perfectly calibrated model with these confidences would measure on this
    many cells: each answer drawn right with probability equal to its confidence, ``draws``
    times; the mean and 95th percentile. On a few hundred cells the binned ECE is far from 0
    even then, so a measured ECE is read against this floor, not against 0."""
    proba = np.asarray(proba, dtype=np.float64)
    if len(proba) == 0:
        return {"mean": float("nan"), "p95": float("nan"), "draws": draws}
    rng = np.random.default_rng(seed)
    top = proba.argmax(axis=1)
    wrong_class = (top + 1) % proba.shape[1]  # any other class: only right or wrong matters to ECE
    values = [ece(proba, np.where(rng.random(len(proba)) < proba.max(axis=1), top, wrong_class))
              for _ in range(draws)]
    return {"mean": float(np.mean(values)), "p95": float(np.percentile(values, 95)), "draws": draws}


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int = 100) -> float:
    """The T minimising the mean NLL of softmax(logits / T) for ``labels`` (class indices)."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if z.ndim != 2 or len(z) != len(y) or len(y) == 0:
        raise ValueError(f"fit_temperature needs logits [N, K] and N labels; got {tuple(z.shape)} and {len(y)}")
    if int(y.min()) < 0 or int(y.max()) >= z.shape[1]:
        raise ValueError(f"labels must be class indices 0..{z.shape[1] - 1}")
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")
    low, high = np.log(MIN_TEMPERATURE), np.log(MAX_TEMPERATURE)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.clamp(low, high).exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(np.exp(np.clip(log_t.item(), low, high)))


def temperature_entry(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """The checkpoint's ``calibration`` entry fitted on these (validation) logits."""
    temperature = fit_temperature(logits, labels)
    return {"method": "temperature", "temperature": temperature, "fitted_on": "val", "n": int(len(labels)),
            "ece_before": ece(softmax(logits), labels),
            "ece_after": ece(softmax(logits, temperature), labels)}


def temperature_of(calibration: dict[str, Any] | None) -> float:
    """T of a checkpoint's ``calibration`` entry; 1.0 (raw softmax) when there is none."""
    if not calibration or calibration.get("method") != "temperature":
        return 1.0
    return float(calibration["temperature"])
