"""evaluate.py on fabricated run directories (split.csv + checkpoint_best.pt), single and 2-fold."""
from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from bloodcell_lib.data import splits
from bloodcell_lib.evaluation.evaluate import evaluate_experiment, evaluate_plain_and_tta, evaluate_run, fold_dirs
from bloodcell_lib.core.fileio import atomic_torch_save
from bloodcell_lib.modeling.models import create_model, resolve_data_config
from bloodcell_lib.evaluation.predict import predict_images
from bloodcell_lib.modeling.checkpoint import CheckpointError
from bloodcell_lib.modeling.loaded import load_checkpoint

CLASSES = ["eosinophil", "lymphocyte", "neutrophil"]
SIZE = 32


def make_checkpoint(path, classes=CLASSES, size=SIZE, seed=0, **extra):
    torch.manual_seed(seed)
    model = create_model("resnet18", len(classes), pretrained=False)
    atomic_torch_save({
        "format": "bloodcell-checkpoint", "format_version": 1, "model": model.state_dict(),
        "optimizer": None, "scheduler": None, "epoch": 2,
        "config": {"model": "resnet18", "image_size": size, "channels_last": False, "tta": False,
                   "monitor": "val_acc"},
        "class_names": list(classes), "model_name": "resnet18",
        "data_config": dict(resolve_data_config("resnet18", size), image_size=size), "best_metric": 0.6,
        **extra,
    }, path)
    return path


@pytest.fixture(scope="module")
def image_table(tmp_path_factory):
    """12 images (4 per class) with a crop box on some, plus one truncated file."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(1)
    rows = []
    for c, name in enumerate(CLASSES):
        for i in range(4):
            arr = rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)
            arr[..., c] = 255  # a class colour, so predictions are not all alike
            path = root / name / f"{name}_{i}.png"
            path.parent.mkdir(exist_ok=True)
            Image.fromarray(arr).save(path)
            rows.append({"path": str(path), "label": name, "split": "", "group": f"{name}{i}", "source": "fake",
                         "box": (2, 3, 30, 33) if i == 0 else None})
    good = root / CLASSES[0] / f"{CLASSES[0]}_1.png"
    bad = root / CLASSES[0] / "broken.jpg"
    buffer = np.asarray(Image.open(good).convert("RGB"))
    Image.fromarray(buffer).save(bad, quality=90)
    bad.write_bytes(bad.read_bytes()[:200])
    rows.append({"path": str(bad), "label": CLASSES[0], "split": "", "group": "broken", "source": "fake", "box": None})
    return pd.DataFrame(rows)


def make_run(run_dir, table, test_rows, seed=0, **extra):
    run_dir.mkdir(parents=True, exist_ok=True)
    t = table.copy()
    t["split"] = ["test" if i in test_rows else ("val" if i % 5 == 0 else "train") for i in range(len(t))]
    splits.save_split(t, run_dir / "split.csv")
    make_checkpoint(run_dir / "checkpoint_best.pt", seed=seed, **extra)
    return run_dir


def test_evaluate_run_writes_files_and_reports_failures(tmp_path, image_table, capsys):
    test_rows = [0, 1, 4, 5, 8, 9, 12]  # 12 = the truncated file
    run = make_run(tmp_path / "run", image_table, test_rows)
    res = evaluate_run(run, cache_dir=tmp_path / "cache", num_workers=0)
    assert len(res.predictions) == 6
    assert list(res.predictions.columns[:4]) == ["path", "label", "predicted", "confidence"]
    assert [f"prob_{c}" for c in CLASSES] == [c for c in res.predictions.columns if c.startswith("prob_")]
    assert len(res.failed) == 1 and "broken.jpg" in res.failed["path"][0]
    assert "broken.jpg" in capsys.readouterr().err  # reported, not silent
    m = res.metrics
    assert m["n"] == 6 and m["n_failed"] == 1 and m["split"] == "test" and m["tta"] is False
    assert m["checkpoint_epoch"] == 2 and sum(map(sum, m["confusion_matrix"])) == 6
    written = json.loads((run / "metrics_test.json").read_text())
    assert written["accuracy"] == m["accuracy"] and written["failed"][0]["reason"]
    on_disk = pd.read_csv(run / "predictions_test.csv")
    assert len(on_disk) == 6 and on_disk.loc[0, "xmin"] == 2 and pd.isna(on_disk.loc[1, "xmin"])
    assert res.y_true.tolist() == [0, 0, 1, 1, 2, 2] and res.proba.shape == (6, 3)


def test_evaluation_matches_predict_images(tmp_path, image_table):
    """Cache + predict_tensors in evaluation == files through predict_images (one inference path)."""
    run = make_run(tmp_path / "run", image_table, [1, 2, 5, 6])  # rows without a crop box
    res = evaluate_run(run, cache_dir=tmp_path / "cache", num_workers=0, tta=True, tag="tta")
    assert (run / "predictions_test_tta.csv").is_file() and res.metrics["tta"] is True
    direct = predict_images(load_checkpoint(run / "checkpoint_best.pt"), list(res.predictions["path"]), tta=True)
    cols = [f"prob_{c}" for c in CLASSES]
    np.testing.assert_allclose(res.predictions[cols].to_numpy(), direct.predictions[cols].to_numpy(), atol=1e-5)


def test_other_split_and_errors(tmp_path, image_table):
    run = make_run(tmp_path / "run", image_table, [0, 4, 8])
    val = evaluate_run(run, split="val", cache_dir=tmp_path / "cache", num_workers=0)
    assert (run / "metrics_val.json").is_file() and val.metrics["split"] == "val"
    with pytest.raises(ValueError, match="no rows of split 'test_simple'.*splits present: test, train, val"):
        evaluate_run(run, split="test_simple", cache_dir=tmp_path / "cache", num_workers=0)
    with pytest.raises(FileNotFoundError, match="split.csv"):
        evaluate_run(tmp_path, cache_dir=tmp_path / "cache")
    (run / "checkpoint_best.pt").write_text("oops")
    with pytest.raises(CheckpointError, match="checkpoint_best.pt"):
        evaluate_run(run, cache_dir=tmp_path / "cache")


def test_evaluate_experiment_folds(tmp_path, image_table):
    exp = tmp_path / "exp"
    folds = [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 11]]
    for i, rows in enumerate(folds):
        make_run(exp / f"fold_{i}", image_table, rows, seed=i)
    assert [p.name for p in fold_dirs(exp)] == ["fold_0", "fold_1"]
    res = evaluate_experiment(exp, cache_dir=tmp_path / "cache", num_workers=0)
    assert len(res.folds) == 2 and len(res.predictions) == 12
    assert sorted(res.predictions["fold"].unique()) == [0, 1]
    m = res.metrics
    assert m["n"] == 12 and m["n_folds"] == 2 and m["pooling"].startswith("out-of-fold")
    pooled_cm = np.array(m["confusion_matrix"])
    np.testing.assert_array_equal(pooled_cm, sum(np.array(f.metrics["confusion_matrix"]) for f in res.folds))
    acc = m["cv"]["metrics"]["accuracy"]
    assert acc["values"] == [f.metrics["accuracy"] for f in res.folds]
    assert acc["mean"] == pytest.approx(np.mean(acc["values"]))
    for f in ("fold_0", "fold_1"):
        assert (exp / f / "metrics_test.json").is_file()
    assert json.loads((exp / "metrics_test.json").read_text())["cv"]["n_folds"] == 2
    # single run through evaluate_experiment
    single = evaluate_experiment(exp / "fold_0", cache_dir=tmp_path / "cache", num_workers=0, write=False)
    assert single.folds == [] and single.metrics["n"] == 6


def test_prediction_sets_scored_per_fold_and_pooled(tmp_path, image_table):
    """Each fold's sets come from its own checkpoint; the pooled coverage is that of all cells."""
    exp = tmp_path / "exp"
    calibration = {"method": "temperature", "temperature": 1.0, "fitted_on": "val", "n": 3}
    for i, (rows, qhat) in enumerate((([0, 2, 4, 6, 8, 10], 0.4), ([1, 3, 5, 7, 9, 11], 0.8))):
        make_run(exp / f"fold_{i}", image_table, rows, seed=i, calibration=calibration,
                 conformal={"method": "lac", "alpha": 0.1, "fitted_on": "val", "n": 3, "qhat": qhat})
    res = evaluate_experiment(exp, cache_dir=tmp_path / "cache", num_workers=0, write=False)
    frame = res.predictions
    members = frame["prediction_set"].str.split(" | ", regex=False)
    covered = [label in inside for label, inside in zip(frame["label"], members)]
    assert res.metrics["conformal"]["coverage"] == pytest.approx(np.mean(covered))
    assert res.metrics["conformal"]["mean_size"] == pytest.approx(members.str.len().mean())
    for fold in res.folds:
        assert fold.metrics["conformal"]["n_val"] == 3 and fold.metrics["conformal"]["n"] == 6
        floor = 1 - fold.metrics["conformal"]["qhat"]
        for row in fold.predictions.itertuples(index=False):  # members: the top class, or p >= 1 - qhat
            members = row.prediction_set.split(" | ")
            assert members[0] == row.predicted
            assert all(getattr(row, f"prob_{c}") >= floor - 1e-6 for c in members[1:])


@pytest.mark.parametrize("cv", [False, True])
def test_plain_and_tta_in_one_pass_equal_two_evaluations(tmp_path, image_table, cv):
    exp = tmp_path / "exp"
    if cv:
        for i, rows in enumerate([[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 11]]):
            make_run(exp / f"fold_{i}", image_table, rows, seed=i)
    else:
        make_run(exp, image_table, [0, 1, 2, 5, 6, 9])
    kwargs = {"cache_dir": tmp_path / "cache", "num_workers": 0}
    plain, with_tta = evaluate_plain_and_tta(exp, **kwargs)
    written = {name: (exp / name).read_text() for name in ("metrics_test.json", "metrics_test_tta.json",
                                                           "predictions_test.csv", "predictions_test_tta.csv")}
    separate_plain = evaluate_experiment(exp, tta=False, **kwargs)
    separate_tta = evaluate_experiment(exp, tta=True, tag="tta", **kwargs)
    assert plain.metrics["tta"] is False and with_tta.metrics["tta"] is True
    for one_pass, separate in ((plain, separate_plain), (with_tta, separate_tta)):
        pd.testing.assert_frame_equal(one_pass.predictions, separate.predictions, atol=1e-6)
        assert one_pass.metrics["accuracy"] == separate.metrics["accuracy"]
    assert not np.allclose(plain.proba, with_tta.proba, atol=1e-4)
    # the one-pass files are those the two separate calls write
    for name, text in written.items():
        if name.endswith(".csv"):
            pd.testing.assert_frame_equal(pd.read_csv(io.StringIO(text)), pd.read_csv(exp / name), atol=1e-6)
        else:
            assert json.loads(text)["accuracy"] == json.loads((exp / name).read_text())["accuracy"]


def test_incomplete_cv_is_refused(tmp_path, image_table):
    exp = tmp_path / "exp"
    make_run(exp / "fold_0", image_table, [0, 4, 8])
    (exp / "fold_1").mkdir()
    with pytest.raises(FileNotFoundError, match="incomplete.*fold_1"):
        evaluate_experiment(exp, cache_dir=tmp_path / "cache", num_workers=0)
