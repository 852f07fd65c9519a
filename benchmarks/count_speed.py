"""How long ``count`` takes on a folder of smear fields (BCCD's 640x480 pictures by default).

    .venv/bin/python benchmarks/count_speed.py --checkpoint runs/bccd/fold_0/checkpoint_best.pt
        [--fields 300] [--data-dir ../shared/data/blood-cells/dataset-master/JPEGImages]
        [--no-overlays] [--out benchmarks/results/count_speed.json]

The first ``--fields`` pictures (sorted) are linked into a temporary folder and counted once
with ``count.count_fields`` (model loading excluded, writing every output included). Prints
and writes (JSON) the wall-clock and CPU seconds, fields per second, the 1-minute load average
before and after (other work on the same cores inflates the wall clock) and the machine.
A benchmark, not a test: it asserts nothing about speed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bloodcell_lib.core.fileio import atomic_write_json  # noqa: E402
from bloodcell_lib.core.paths import SHARED_DATA_DIR  # noqa: E402
from bloodcell_lib.core.provenance import machine_info  # noqa: E402
from bloodcell_lib.evaluation.count import count_fields  # noqa: E402
from bloodcell_lib.modeling.loaded import load_checkpoint  # noqa: E402


def measure(checkpoint: str, pictures: list[Path], overlays: bool) -> dict:
    loaded = load_checkpoint(checkpoint)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "fields"
        folder.mkdir()
        for picture in pictures:
            (folder / picture.name).symlink_to(picture.resolve())
        load_before = os.getloadavg()[0]
        wall, cpu = time.perf_counter(), time.process_time()
        result = count_fields(loaded, folder, Path(scratch) / "out", overlays=overlays)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"fields": len(result.fields), "cells": len(result.cells), "skipped": len(result.skipped),
            "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "fields_per_s": round(len(pictures) / wall, 1),
            "overlays": overlays, "load_1min_before": load_before, "load_1min_after": os.getloadavg()[0],
            "checkpoint": checkpoint, "machine": machine_info()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--fields", type=int, default=300)
    parser.add_argument("--data-dir", default=str(SHARED_DATA_DIR / "blood-cells" / "dataset-master" / "JPEGImages"))
    parser.add_argument("--no-overlays", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/count_speed.json")
    args = parser.parse_args(argv)
    pictures = sorted(Path(args.data_dir).glob("*.jpg"))[:args.fields]
    if not pictures:
        print(f"error: no .jpg pictures in {args.data_dir}", file=sys.stderr)
        return 2
    numbers = measure(args.checkpoint, pictures, overlays=not args.no_overlays)
    atomic_write_json(args.out, numbers)
    print(json.dumps({k: v for k, v in numbers.items() if k != "machine"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
