"""Inference engine benchmark: every installed engine side by side on the same PBC JPEGs.

    .venv/bin/python benchmarks/engines.py --checkpoint runs/pbc-quick/checkpoint_best.pt \
        [--images 2000] [--repeats 2] [--out benchmarks/results/engines.json]

The pictures are PBC images the checkpoint never trained or validated on: the test rows of
the ``split.csv`` beside it, then PBC files absent from that split (every k-th, so all
classes appear). For each engine (``engines.available_engines()``):

- cold: seconds from opening the checkpoint (loading, exporting to ONNX in memory,
  compiling) to the probabilities of the first 64 pictures, decoding included;
- warm, from JPEG: pictures per second through ``predict.predict_images`` (decode, crop,
  resize, normalise, infer) at batch 64 and at batch 1, best of ``--repeats`` rounds
  (the engines take turns, in reversed order every other round, so a busy spell or a load
  that falls during the run favours none of them);
- batch-1 latency of the engine alone (one preprocessed picture, median of 50 calls);
- agreement with torch on all pictures: share of identical top-1, largest probability difference.

A benchmark, not a test: it prints a table and writes JSON, and asserts nothing. The
machine is shared and noisy: compare ratios within one run, not numbers across runs.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/engines.py` without an installed package
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bloodcell_lib.core import provenance  # noqa: E402
from bloodcell_lib.core.fileio import atomic_write_json  # noqa: E402
from bloodcell_lib.evaluation import engines  # noqa: E402
from bloodcell_lib.evaluation.pictures import _load_one  # noqa: E402
from bloodcell_lib.evaluation.predict import predict_images  # noqa: E402


def unseen_pbc_images(checkpoint: Path, n: int, pbc_dir: Path | None = None) -> list[str]:
    """``n`` PBC pictures outside the checkpoint's train/val: its test rows, then unused files."""
    split = pd.read_csv(checkpoint.parent / "split.csv")
    picked = sorted(split.loc[split["split"] == "test", "path"])
    if len(picked) < n:
        pbc_dir = pbc_dir or Path(split["path"].iloc[0]).parent.parent
        used = set(split["path"])
        unused = sorted(str(p) for p in pbc_dir.rglob("*.jpg") if str(p) not in used)
        step = max(1, len(unused) // (n - len(picked)))
        picked += unused[::step][: n - len(picked)]
    return picked[:n]


def _rate(engine: engines.Engine, files: list[str], batch_size: int) -> tuple[float, np.ndarray]:
    result = predict_images(engine, files, batch_size=batch_size)
    if len(result.skipped):
        raise RuntimeError(f"benchmark pictures could not be read: {result.skipped.head().to_dict('records')}")
    proba = result.predictions[[f"prob_{c}" for c in engine.loaded.class_names]].to_numpy()
    return len(files) / result.seconds, proba


def _latency_ms(engine: engines.Engine, file: str, calls: int = 50) -> float:
    from bloodcell_lib.data.transforms import normalize_batch

    loaded = engine.loaded
    image, _ = _load_one(file, loaded.image_size, loaded.data_config)
    batch = normalize_batch(image[None].to(engine.device), loaded.data_config, engine.channels_last)
    engine.run(batch)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        engine.run(batch)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _cold(name: str, checkpoint: Path, files: list[str]) -> tuple[float, engines.Engine]:
    start = time.perf_counter()
    engine = engines.open_engine(checkpoint, name)
    predict_images(engine, files[:64], batch_size=64)
    return time.perf_counter() - start, engine


def run(checkpoint: Path, n_images: int, repeats: int, names: list[str], single: int = 50) -> dict[str, Any]:
    files = unseen_pbc_images(checkpoint, n_images)
    load_start = os.getloadavg()[0]
    rows: dict[str, dict[str, Any]] = {}
    opened: dict[str, engines.Engine] = {}
    for name in names:
        seconds, opened[name] = _cold(name, checkpoint, files)
        rows[name] = {"engine": name, "cold_first_64_s": seconds, "jpeg_img_s_b64": 0.0, "jpeg_img_s_b1": 0.0}
    probas: dict[str, np.ndarray] = {}
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:  # a load that drifts favours no engine
            rate, probas[name] = _rate(opened[name], files, 64)
            rows[name]["jpeg_img_s_b64"] = max(rows[name]["jpeg_img_s_b64"], rate)
            rate, _ = _rate(opened[name], files[:single], 1)
            rows[name]["jpeg_img_s_b1"] = max(rows[name]["jpeg_img_s_b1"], rate)
    reference = probas.get("torch")
    for name in names:
        rows[name]["latency_ms_b1"] = _latency_ms(opened[name], files[0])
        if reference is not None:
            rows[name]["top1_agree"] = float((probas[name].argmax(1) == reference.argmax(1)).mean())
            rows[name]["max_prob_diff"] = float(np.abs(probas[name] - reference).max())
            rows[name]["x_torch_b64"] = rows[name]["jpeg_img_s_b64"] / rows["torch"]["jpeg_img_s_b64"]
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "checkpoint": str(checkpoint), "images": len(files), "repeats": repeats,
            "machine": provenance.machine_info(), "loadavg_start": load_start,
            "loadavg_end": os.getloadavg()[0], "rows": list(rows.values())}


def table(result: dict[str, Any]) -> str:
    head = ("| engine | cold, first 64 (s) | JPEG img/s, batch 64 | x torch | JPEG img/s, batch 1 "
            "| latency batch 1, model only (ms) | top-1 = torch | max prob diff |")
    lines = [head, "|" + "---|" * 8]
    for r in result["rows"]:
        lines.append(f"| {r['engine']} | {r['cold_first_64_s']:.1f} | {r['jpeg_img_s_b64']:.0f} "
                     f"| {r.get('x_torch_b64', float('nan')):.2f} | {r['jpeg_img_s_b1']:.0f} "
                     f"| {r['latency_ms_b1']:.1f} | {100 * r.get('top1_agree', float('nan')):.2f} % "
                     f"| {r.get('max_prob_diff', float('nan')):.1e} |")
    m = result["machine"]
    lines.append(f"\n{result['images']} PBC JPEGs, {result['date']}, {m['processor']}, {m['cpus_usable']} usable "
                 f"CPUs, load average {result['loadavg_start']:.2f} at start / {result['loadavg_end']:.2f} at end.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a .pt checkpoint with split.csv beside it")
    parser.add_argument("--images", type=int, default=2000, help="PBC pictures to time (default 2000)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the warm timings (default 2)")
    parser.add_argument("--engines", nargs="+", default=None, help="default: every installed engine")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "engines.json")
    args = parser.parse_args(argv)
    names = args.engines or engines.available_engines()
    if "torch" in names:  # the reference goes first so that the ratios have their denominator
        names = ["torch"] + [n for n in names if n != "torch"]
    result = run(args.checkpoint, args.images, max(1, args.repeats), names)
    atomic_write_json(args.out, result)
    print(table(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
