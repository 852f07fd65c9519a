"""benchmarks/throughput.py: a smoke test of its functions on tiny generated JPEGs.

Nothing here asserts a speed: the speed targets are measured by the benchmark itself
(benchmarks/README.md), not by tests, which must pass on any machine under any load.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import benchmark_script

CLASSES = ("circle", "square", "stripes")


@pytest.fixture(scope="module")
def bench():
    with benchmark_script("throughput") as module:
        yield module


@pytest.fixture(scope="module")
def tiny_jpegs(tmp_path_factory) -> Path:
    """Folder-per-class JPEGs: each class a shape in its own colour (learnable in a few steps)."""
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("bench") / "data"
    rng = np.random.default_rng(0)
    colours = [(200, 40, 40), (40, 160, 40), (40, 40, 200)]
    for ci, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(12):
            img = Image.new("RGB", (40, 44), tuple(int(v) for v in rng.integers(150, 230, 3)))
            draw = ImageDraw.Draw(img)
            o = int(rng.integers(2, 8))
            if ci == 0:
                draw.ellipse([o, o, 40 - o, 44 - o], fill=colours[ci])
            elif ci == 1:
                draw.rectangle([o, o, 40 - o, 44 - o], fill=colours[ci])
            else:
                for x in range(o, 40, 8):
                    draw.rectangle([x, 0, x + 3, 44], fill=colours[ci])
            img.save(root / name / f"{name}_{i:03d}.jpg", quality=90)
    return root


def test_parse_args_defaults_quick_and_overrides(bench):
    s = bench.parse_args([])
    assert (s.train_images, s.val_images, s.epochs, s.image_size) == tuple(
        bench.DEFAULTS[k] for k in ("train_images", "val_images", "epochs", "image_size"))
    assert (s.dataset, s.model, s.batch_size, s.pretrained) == ("pbc", "efficientnet_lite0", 32, True)
    q = bench.parse_args(["--quick"])
    assert (q.train_images, q.epochs, q.image_size) == (bench.QUICK["train_images"], bench.QUICK["epochs"],
                                                        bench.QUICK["image_size"])
    assert bench.parse_args(["--quick", "--epochs", "4"]).epochs == 4  # explicit options win over --quick
    with pytest.raises(SystemExit):
        bench.parse_args(["--epochs", "0"])
    assert s.unfreeze_last == 5 and bench.parse_args(["--unfreeze-last", "0"]).unfreeze_last == 0
    assert s.adapt_frozen_bn and not bench.parse_args(["--frozen-bn", "pretrained"]).adapt_frozen_bn
    with pytest.raises(SystemExit):
        bench.parse_args(["--unfreeze-last", "-1"])


def _epochs(rates, n=100):
    return [{"epoch": i + 1, "train_samples": n, "train_pass_seconds": n / r, "images_per_second": r,
             "data_seconds": 0.5 * n / r, "compute_seconds": 0.5 * n / r} for i, r in enumerate(rates)]


def test_summarise_arithmetic(bench):
    """Speed-ups from given (made-up) epoch records: steady state = epochs 2..E; the cache build
    is charged to epoch 1 and to the whole run."""
    naive = {"epochs": _epochs([5.0, 10.0, 10.0]), "val_acc": 0.80}
    project = {"epochs": _epochs([10.0, 25.0, 25.0]), "val_acc": 0.85, "cache_seconds": 10.0}
    s = bench.summarise(naive, project, n_val=100)
    assert s["steady_state_epochs"] == [2, 3]
    assert s["speedup_steady"] == pytest.approx(2.5)
    assert s["project_epoch1_with_cache_images_per_second"] == pytest.approx(100 / (10 + 10))
    assert s["speedup_all_epochs_with_cache"] == pytest.approx((300 / (10 + 4 + 4 + 10)) / (300 / (20 + 10 + 10)))
    assert s["naive_steady_data_fraction"] == pytest.approx(0.5)
    assert s["speedup_target_met"] and s["accuracy_target_met"]
    one = bench.summarise({"epochs": _epochs([5.0]), "val_acc": 0.9},
                          {"epochs": _epochs([5.0]), "val_acc": 0.8, "cache_seconds": 0.0}, n_val=100)
    assert one["steady_state_epochs"] == [1] and not one["accuracy_target_met"]
    all_layers = {"epochs": _epochs([8.0, 15.0, 15.0]), "val_acc": 0.82, "cache_seconds": 10.0}
    s = bench.summarise(naive, project, n_val=100, all_layers=all_layers)
    assert s["speedup_all_layers_steady"] == pytest.approx(1.5)
    assert s["val_acc_difference_all_layers"] == pytest.approx(0.02)
    assert s["speedup_steady"] == pytest.approx(2.5)  # the headline stays the project's own path
    # Several runs per path: rates pooled over every run, accuracy = mean, SE from paired runs.
    two = bench.summarise(bench.combine_runs([naive, {**naive, "val_acc": 0.84}]),
                          bench.combine_runs([project, {**project, "val_acc": 0.87}]), n_val=100)
    assert two["speedup_steady"] == pytest.approx(2.5) and two["runs_per_path"] == 2
    assert two["val_acc_difference"] == pytest.approx(0.04)  # (0.85 + 0.87) / 2 - (0.80 + 0.84) / 2
    assert two["val_acc_difference_standard_error"] == pytest.approx(0.01)  # paired diffs 0.05, 0.03
    assert two["project_epoch1_with_cache_images_per_second"] == pytest.approx(200 / (20 + 20))


def test_busy_warning(bench):
    assert bench.busy_warning(0.1, 2.1, 2.0, 2) is None  # only the benchmark itself was running
    assert "busy" in bench.busy_warning(3.0, 5.0, 1.0, 2)


def test_main_runs_end_to_end_on_tiny_images(bench, tiny_jpegs, tmp_path, monkeypatch, capsys):
    from bloodcell_lib.core import provenance

    monkeypatch.setattr(provenance, "git_commit", lambda *a, **k: None)  # no git subprocess
    out = tmp_path / "results" / "throughput.json"
    threads = torch.get_num_threads()
    rc = bench.main(["--dataset", "folder", "--data-dir", str(tiny_jpegs), "--model", "resnet18",
                     "--no-pretrained", "--image-size", "32", "--train-images", "24", "--val-images", "12",
                     "--epochs", "2", "--batch-size", "8", "--threads", "1", "--seeds", "2", "--unfreeze-last", "3",
                     "--out", str(out)])
    assert rc == 0
    assert torch.get_num_threads() == threads  # the caller's settings are left as they were
    printed = capsys.readouterr().out
    assert "| path | train img/s | speed-up | val accuracy | predict img/s |" in printed
    assert not list(out.parent.glob(".*.tmp"))  # written atomically
    result = json.loads(out.read_text())
    assert result["format"] == bench.FORMAT
    for key in ("settings", "train_config", "data", "machine", "naive", "project", "predict", "summary",
                "table_markdown", "wall_seconds"):
        assert key in result
    assert {"cpu_count", "torch", "torch_threads", "platform"} <= set(result["machine"])
    data = result["data"]
    assert data["train_images"] + data["val_images"] == 36 and data["val_images"] > 0
    assert len(result["naive"]["epochs"]) == len(result["project"]["epochs"]) == 2
    assert result["train_config"]["channels_last"] is True and result["train_config"]["use_cache"] is False
    # the project's path trains the last 3 stages (frozen BN statistics adapted); the ablation
    # run trains every layer, as naive does
    assert (result["train_config"]["freeze"], result["train_config"]["unfreeze_last"],
            result["train_config"]["adapt_frozen_bn"]) == ("backbone", 3, True)
    assert "frozen BN statistics adapted" in printed
    assert len(result["project_all_layers"]["epochs"]) == 2
    assert "| ablation: the same project path training all layers" in printed
    # same optimizer and learning-rate schedule in both paths, epoch by epoch
    assert [e["lr"] for e in result["naive"]["epochs"]] == [e["lr"] for e in result["project"]["epochs"]]
    # Two training seeds per path, on the same images; accuracy is their mean.
    runs = result["project"]["runs"]
    first = runs[0]
    assert len(runs) == len(result["naive"]["runs"]) == len(result["project_all_layers"]["runs"]) == 2
    assert result["project"]["val_acc"] == pytest.approx(sum(r["val_acc"] for r in runs) / 2)
    assert result["summary"]["runs_per_path"] == 2
    assert "paired over 2 training seeds" in result["summary"]["val_acc_difference_standard_error_method"]
    # Same held-out images for every prediction path; the project's predict paths agree with
    # the accuracy fit() measured on the same model.
    pred = result["predict"]
    assert pred["images"] == data["val_images"] and pred["predict_images"]["skipped"] == 0
    assert pred["predict_images"]["val_acc"] == pred["predict_tensors"]["val_acc"] == first["val_acc"]
    for value in (result["summary"]["speedup_steady"], result["summary"]["speedup_all_epochs_with_cache"],
                  pred["naive_per_image"]["images_per_second"]):
        assert math.isfinite(value) and value > 0  # present and computed; their size is not a test matter
