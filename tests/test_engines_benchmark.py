"""benchmarks/engines.py: picks only pictures the checkpoint never trained or validated on,
and formats its table (timings are not asserted: this is a benchmark)."""
from __future__ import annotations

import pandas as pd

from conftest import benchmark_script


def test_unseen_pictures_exclude_train_and_val(tmp_path):
    root = tmp_path / "pbc"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            (root / cls / f"{i}.jpg").write_bytes(b"x")
    rows = [(str(root / "a" / "0.jpg"), "train"), (str(root / "a" / "1.jpg"), "val"),
            (str(root / "b" / "0.jpg"), "test")]
    pd.DataFrame(rows, columns=["path", "split"]).to_csv(tmp_path / "split.csv", index=False)
    with benchmark_script("engines") as bench:
        picked = bench.unseen_pbc_images(tmp_path / "checkpoint_best.pt", 5, pbc_dir=root)
    assert len(picked) == 5 == len(set(picked))
    assert picked[0] == str(root / "b" / "0.jpg")
    assert not {str(root / "a" / "0.jpg"), str(root / "a" / "1.jpg")} & set(picked)
    assert {p.split("/")[-2] for p in picked} == {"a", "b"}


def test_table_names_every_engine_and_the_load():
    rows = [{"engine": n, "cold_first_64_s": 1.0, "jpeg_img_s_b64": r, "jpeg_img_s_b1": 5.0, "latency_ms_b1": 2.0,
             "top1_agree": 1.0, "max_prob_diff": 0.0, "x_torch_b64": r / 100} for n, r in (("torch", 100), ("onnxruntime", 300))]
    result = {"rows": rows, "images": 10, "date": "today", "loadavg_start": 3.5, "loadavg_end": 1.0,
              "machine": {"processor": "cpu", "cpus_usable": 2}}
    with benchmark_script("engines") as bench:
        text = bench.table(result)
    assert "| onnxruntime | 1.0 | 300 | 3.00 |" in text and "load average 3.50 at start" in text
