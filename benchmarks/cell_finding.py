"""Does the stain rule find the white cell in every lab's pictures? (issue 27 item 2)

    .venv/bin/python benchmarks/cell_finding.py [--every 3] [--data-dir ../shared/data]
        [--out benchmarks/results/cell_finding.json]

Prints, one row a lab (``evaluation.localisation.localisation_table``): the share of pictures
in which a nucleus is found (PBC crops, PBC native exports, LISC, Kaggle dataset2 TEST,
KRD-WBC), on KRD-WBC the share whose nucleus square overlaps the mask's box at IoU >= 0.5 and
``find_nuclei``'s recall/precision against it, on BCCD ``find_nuclei``'s detection recall and
precision against the annotated WBC boxes. Every ``--every``-th picture of a lab is used
(BCCD: all fields). Writes the table (and the stain/nuclei METHOD strings) as JSON.
A measurement, not a test: it asserts nothing.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bloodcell_lib.core.fileio import atomic_write_json  # noqa: E402
from bloodcell_lib.data import nuclei, stain  # noqa: E402
from bloodcell_lib.evaluation.localisation import as_markdown, localisation_table  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=3, help="keep every n-th picture of each lab (default 3)")
    parser.add_argument("--data-dir", default=None, help="data root (default: the usual data roots)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cell_finding.json"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    table = localisation_table(args.data_dir, args.every)
    result = {"stain_method": stain.METHOD, "nuclei_method": nuclei.METHOD, "every": args.every,
              "seconds": round(time.perf_counter() - start, 1),
              "table": table.astype(object).where(table.notna(), None).to_dict(orient="records")}
    print(f"stain: {stain.METHOD}\nnuclei: {nuclei.METHOD}\nevery {args.every}. picture of each lab, {result['seconds']} s\n")
    print(as_markdown(table))
    if args.out:
        atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
