"""A white-cell differential: counts per cell type with 95 % Wilson score intervals.

A differential of 100 cells says "62 % neutrophils", but with 100 cells the true share could
be anywhere from about 52 % to 71 %; with 3 cells in a field, much wider still. The Wilson
interval (Wilson 1927) stays inside 0..1 and keeps sensible widths at 0 or n counts, where the
textbook normal interval collapses to a point.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import pandas as pd

Z_95 = 1.959963984540054  # two-sided 95 % quantile of the standard normal


def wilson_interval(count: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """(low, high) Wilson score interval of the proportion count/total; (0, 1) for total 0."""
    if total < 0 or not 0 <= count <= total:
        raise ValueError(f"need 0 <= count <= total, got count={count}, total={total}")
    if total == 0:
        return 0.0, 1.0
    p = count / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def differential(labels: Iterable[str], class_names: Sequence[str], scope: str) -> pd.DataFrame:
    """One row per class: scope, class, count, total, percent, ci_low, ci_high (percent)."""
    labels = list(labels)
    rows = []
    for name in class_names:
        count = sum(label == name for label in labels)
        low, high = wilson_interval(count, len(labels))
        rows.append({"scope": scope, "class": name, "count": count, "total": len(labels),
                     "percent": 100.0 * count / len(labels) if labels else float("nan"),
                     "ci_low": 100.0 * low, "ci_high": 100.0 * high})
    return pd.DataFrame(rows, columns=["scope", "class", "count", "total", "percent", "ci_low", "ci_high"])
