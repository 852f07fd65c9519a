"""What ``count`` writes: the CSV tables, one overlay PNG per field, ``index.html`` and ``review.html``
(the review page of every counted cell, ``review_page``).

The overlay draws each counted cell's box with its number (the ``cell`` column of cells.csv)
and predicted type, so a reviewer can find in the picture the cell a CSV row is about.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import jinja2
from PIL import ImageDraw, ImageFont

from bloodcell_lib.core.fileio import atomic_open, atomic_write_text
from bloodcell_lib.data.images import load_rgb
from bloodcell_lib.evaluation.review_page import write_review_page
from bloodcell_lib.modeling.loaded import LoadedModel

BOX_COLOUR = (255, 215, 0)  # yellow: stands out on pink red cells and violet nuclei
OVERLAYS_DIR = "overlays"

PAGE = jinja2.Template("""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>White-cell count</title>
<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td:first-child,th:first-child{text-align:left}
.field{display:inline-block;vertical-align:top;margin:4px;width:330px}.field img{width:320px}</style></head>
<body><h1>White-cell count</h1>
<p>{{ n_fields }} field(s), {{ n_cells }} white cell(s) counted with checkpoint <code>{{ checkpoint }}</code>
({{ model }}). Intervals: 95 % Wilson score.</p>
{% if n_cells %}<p><a href="review.html">Review and label the cells</a> (flagged cells first; saves labels.csv).</p>{% endif %}
{% for scope, rows in folders %}<h2>{{ scope }}</h2><table><tr><th>type</th><th>count</th><th>%</th>
<th>95 % interval</th></tr>{% for r in rows %}<tr><td>{{ r["class"] }}</td><td>{{ r["count"] }}</td>
<td>{{ "%.1f"|format(r["percent"]) }}</td><td>{{ "%.1f"|format(r["ci_low"]) }} - {{ "%.1f"|format(r["ci_high"]) }}</td>
</tr>{% endfor %}</table>{% endfor %}
{% if no_cells %}<h2>Fields without a white cell ({{ no_cells|length }})</h2><ul>
{% for f in no_cells %}<li>{{ f.path }}: {{ f.reason }}</li>{% endfor %}</ul>{% endif %}
{% if skipped %}<h2>Skipped files ({{ skipped|length }})</h2><ul>
{% for f in skipped %}<li>{{ f.path }}: {{ f.reason }}</li>{% endfor %}</ul>{% endif %}
<h2>Fields</h2>
{% for f in fields %}<div class="field">{% if f.overlay %}<a href="{{ f.overlay }}"><img src="{{ f.overlay }}"
alt="{{ f.path }}"></a><br>{% endif %}<b>{{ f.path }}</b><br>{% for c in f.cells %}{{ c.cell }}. {{ c.predicted }}
({{ "%.2f"|format(c.confidence) }}){% if c.needs_review %} <b>review: {{ c.review_reason }}</b>{% endif %}<br>
{% else %}{{ f.reason }}{% endfor %}</div>
{% endfor %}</body></html>
""", autoescape=True)


def overlay_name(index: int, path: str) -> str:
    """A unique, file-system-safe overlay name: fields from different folders may share a name."""
    return f"{index:05d}_{re.sub(r'[^A-Za-z0-9._-]', '_', Path(path).stem)}.png"


@lru_cache(maxsize=8)
def _font(size: int):
    return ImageFont.load_default(size=size)  # a FreeType load: once per size, not per field


def draw_overlay(path: str, cells, out: Path) -> None:
    """The field with each cell's numbered, labelled box (``cells``: rows of cells.csv)."""
    image = load_rgb(path)
    draw = ImageDraw.Draw(image)
    font = _font(max(12, image.height // 30))
    width = max(2, image.height // 200)
    for cell in cells.itertuples(index=False):
        box = (cell.xmin, cell.ymin, cell.xmax - 1, cell.ymax - 1)
        draw.rectangle(box, outline=BOX_COLOUR, width=width)
        label = f"{cell.cell} {cell.predicted} {cell.confidence:.2f}"
        draw.text((cell.xmin + width + 2, cell.ymin + width), label, fill=BOX_COLOUR, font=font,
                  stroke_width=2, stroke_fill=(0, 0, 0))
    with atomic_open(out, "wb") as handle:
        image.save(handle, format="PNG", compress_level=1)  # speed over a few kB


def write_outputs(result, loaded: LoadedModel, *, overlays: bool) -> None:
    """cells.csv, fields.csv, differential.csv, skipped.csv, overlays/ and index.html."""
    out = result.out_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "cells.csv", result.cells.to_csv(index=False))
    atomic_write_text(out / "fields.csv", result.fields.to_csv(index=False))
    atomic_write_text(out / "differential.csv", result.differential.to_csv(index=False))
    atomic_write_text(out / "skipped.csv", result.skipped.to_csv(index=False))
    by_path = {path: group for path, group in result.cells.groupby("path", sort=False)}
    page_fields = []
    for index, field in enumerate(result.fields.itertuples(index=False)):
        cells = by_path.get(field.path, result.cells.iloc[:0])
        name = None
        if overlays:
            (out / OVERLAYS_DIR).mkdir(exist_ok=True)
            name = f"{OVERLAYS_DIR}/{overlay_name(index, field.path)}"
            draw_overlay(field.path, cells, out / name)
        page_fields.append({"path": field.path, "reason": field.reason, "overlay": name,
                            "cells": cells.to_dict("records")})
    summary = result.differential[result.differential["level"] != "field"]
    folders = [(scope, rows.to_dict("records")) for scope, rows in summary.groupby("scope", sort=False)]
    html = PAGE.render(n_fields=len(result.fields), n_cells=len(result.cells), checkpoint=loaded.path,
                       model=loaded.model_name, folders=folders, fields=page_fields,
                       no_cells=[f for f in page_fields if not f["cells"]],
                       skipped=result.skipped.to_dict("records"))
    atomic_write_text(out / "index.html", html)
    if len(result.cells):  # every counted cell on the review page (evaluation/review_page.py)
        write_review_page(result.cells.to_dict("records"), loaded.class_names, out / "review.html",
                          f"Review {len(result.cells)} counted cells")
