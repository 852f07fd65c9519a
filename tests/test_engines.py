"""engines.py: every installed engine gives torch's probabilities and k-NN OOD scores on
real PBC pictures through the one preprocessing path; engine choice and errors; predict
--engine on a folder with a broken file."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from bloodcell_lib.evaluation import engines, predict
from bloodcell_lib.evaluation.engines import EngineError, open_engine
from bloodcell_lib.evaluation.export import export_onnx
from bloodcell_lib.evaluation.predict import predict_images
from bloodcell_lib.modeling import neighbours
from conftest import real_data
from test_predict import CLASSES, make_checkpoint

ONNX_ENGINES = [name for name in engines.available_engines() if name != "torch"]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """A checkpoint whose review flags use the k-NN score (a random bank of 1024-d features,
    the input of mobilenet_v3_small's last layer), and its ONNX export."""
    folder = tmp_path_factory.mktemp("engines")
    bank = neighbours.bank_entry(torch.randn(40, 1024, generator=torch.Generator().manual_seed(0)),
                                 {name: 10 for name in CLASSES})
    review = {"confidence_threshold": 0.5, "ood_score": "knn", "ood_threshold": 1.0,
              "ood_thresholds": {"knn": 1.0, "energy": -1.0}}
    ckpt = make_checkpoint(folder / "checkpoint_best.pt", model_name="mobilenet_v3_small", size=64,
                           feature_bank=bank, review=review,
                           calibration={"method": "temperature", "temperature": 1.0, "n": 10, "fitted_on": "val",
                                        "ece_before": 0.1, "ece_after": 0.1})
    return ckpt, export_onnx(ckpt, folder / "model.onnx")


@pytest.fixture(scope="module")
def pbc_pictures(tmp_path_factory):
    """Two real PBC pictures per class (copied: the data root is never written), one broken file."""
    root = real_data("pbc")
    folder = tmp_path_factory.mktemp("pbc")
    for class_dir in sorted(p for p in root.rglob("*") if p.is_dir() and any(p.glob("*.jpg")))[:4]:
        for picture in sorted(class_dir.glob("*.jpg"))[:2]:
            shutil.copy(picture, folder / f"{class_dir.name}_{picture.name}")
    (folder / "broken.jpg").write_bytes((folder / sorted(p.name for p in folder.iterdir())[0]).read_bytes()[:300])
    return folder


@pytest.mark.integration
@pytest.mark.parametrize("name", ONNX_ENGINES)
def test_engine_agrees_with_torch_on_pbc(name, model_files, pbc_pictures):
    ckpt, onnx_path = model_files
    reference = predict_images(open_engine(ckpt, "torch"), pbc_pictures)
    result = predict_images(open_engine(onnx_path, name), pbc_pictures)
    assert len(result.predictions) == len(reference.predictions) == 8
    columns = [f"prob_{c}" for c in CLASSES] + ["ood_score"]
    diff = np.abs(result.predictions[columns].to_numpy() - reference.predictions[columns].to_numpy())
    assert diff.max() <= 1e-4
    # the score is the k-NN distance (in [0, 2]), not energy, in both
    assert reference.predictions["ood_score"].between(0, 2).all()
    assert (result.predictions["predicted"] == reference.predictions["predicted"]).all()
    assert list(result.skipped["path"].str.rsplit("/", n=1).str[-1]) == ["broken.jpg"]


def test_engine_run_shapes(model_files):
    rng = np.random.default_rng(0)
    batch = rng.standard_normal((3, 3, 64, 64)).astype(np.float32)
    sources = {name: model_files[0] if name == "torch" else model_files[1] for name in engines.available_engines()}
    outputs = {name: open_engine(source, name).run(torch.from_numpy(batch)) for name, source in sources.items()}
    for name, (logits, knn) in outputs.items():
        assert logits.shape == (3, len(CLASSES)) and logits.dtype == np.float32, name
        assert knn.shape == (3,), name
        np.testing.assert_allclose(logits, outputs["torch"][0], atol=1e-4, err_msg=name)
        np.testing.assert_allclose(knn, outputs["torch"][1], atol=1e-4, err_msg=name)


def test_default_is_the_first_installed_and_named(model_files):
    """A .pt checkpoint given to the default (an ONNX runtime when one is installed) is
    exported in memory and then gives the exported file's logits."""
    assert engines.default_engine() == engines.available_engines()[0]
    assert engines.default_engine("cuda") == "torch"
    engine = open_engine(model_files[0])
    assert engine.name == engines.available_engines()[0]
    batch = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32))
    expected = open_engine(model_files[1 if ONNX_ENGINES else 0], engine.name).run(batch)
    for got, want in zip(engine.run(batch), expected):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_engine_errors(model_files, monkeypatch):
    ckpt, onnx_path = model_files
    with pytest.raises(EngineError, match="engine 'tensorrt' is not known"):
        open_engine(ckpt, "tensorrt")
    with pytest.raises(EngineError, match="engine torch needs a .pt checkpoint"):
        open_engine(onnx_path, "torch")
    monkeypatch.setattr(engines, "available_engines", lambda: ["torch"])
    with pytest.raises(EngineError, match="engine onnxruntime is not installed"):
        open_engine(ckpt, "onnxruntime")


@pytest.mark.integration
@pytest.mark.parametrize("name", engines.available_engines())
def test_cli_engine_on_folder_with_broken_file(name, model_files, pbc_pictures, tmp_path, capsys):
    ckpt, onnx_path = model_files
    out = tmp_path / "pred.csv"
    source = ckpt if name == "torch" else onnx_path
    assert predict.main([str(pbc_pictures), "--checkpoint", str(source), "--engine", name, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"engine {name}" in printed and "skipped" in printed and "broken.jpg" in printed
    assert len(pd.read_csv(out)) == 8
    assert list(pd.read_csv(tmp_path / "pred_skipped.csv")["path"].str.endswith("broken.jpg")) == [True]


def test_cli_refuses_a_text_file_as_onnx(tmp_path, pbc_pictures, capsys):
    fake = tmp_path / "model.onnx"
    fake.write_text("hello")
    assert predict.main([str(pbc_pictures), "--checkpoint", str(fake), "--engine", "onnxruntime"]) == 2
    assert "model.onnx is not an ONNX model" in capsys.readouterr().err
