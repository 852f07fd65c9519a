"""Numbers as the reports' display text (tables of index.html and 04_report)."""
from __future__ import annotations

import math
from typing import Any


def format_score(value: Any, sd: Any = None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = f"{value:.{digits}f}"
    if sd is not None and not (isinstance(sd, float) and math.isnan(sd)):
        text += f" \u00b1 {sd:.{digits}f}"
    return text


def cell_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) >= 1 else f"{value:.1f}"
    return str(value)

