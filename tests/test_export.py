"""export.py: checkpoint -> self-contained ONNX file, metadata round trip, clear errors for
files that are not (bloodcell) ONNX models, and the command line."""
from __future__ import annotations

import json

import pytest

from bloodcell_lib.__main__ import main as cli_main
from bloodcell_lib.evaluation import export
from bloodcell_lib.evaluation.export import OnnxModelError, export_onnx, read_onnx
from bloodcell_lib.modeling.checkpoint import CheckpointError
from bloodcell_lib.modeling.loaded import load_checkpoint
from test_predict import CLASSES, SIZE, make_checkpoint

onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    ckpt = make_checkpoint(folder / "checkpoint_best.pt", calibration={"temperature": 1.7})
    return ckpt, export_onnx(ckpt, folder / "model.onnx", opset=17)


def test_metadata_round_trip(exported):
    ckpt, path = exported
    loaded = load_checkpoint(ckpt)
    data, onnx_loaded = read_onnx(path)
    assert onnx_loaded.class_names == CLASSES and onnx_loaded.image_size == SIZE
    for key in ("mean", "std"):
        assert onnx_loaded.data_config[key] == pytest.approx(list(loaded.data_config[key]))
    assert onnx_loaded.calibration == {"temperature": 1.7}
    assert onnx_loaded.opset == 17
    proto = onnx.load_from_string(data)
    assert any(o.domain in ("", "ai.onnx") and o.version == 17 for o in proto.opset_import)
    stored = json.loads({p.key: p.value for p in proto.metadata_props}[export.METADATA_KEY])
    assert stored["format"] == export.ONNX_FORMAT


def test_batch_axis_is_dynamic(exported):
    proto = onnx.load(str(exported[1]))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, SIZE, SIZE]


def test_not_onnx_and_foreign_onnx_refused(tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("not a model\n")
    with pytest.raises(OnnxModelError, match="notes.onnx is not an ONNX model"):
        read_onnx(text)
    with pytest.raises(OnnxModelError, match="does not exist"):
        read_onnx(tmp_path / "missing.onnx")
    foreign = tmp_path / "foreign.onnx"
    helper = onnx.helper
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "foreign",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])])
    onnx.save(helper.make_model(graph), str(foreign))
    with pytest.raises(OnnxModelError, match="not one exported by bloodcell"):
        read_onnx(foreign)
    assert issubclass(OnnxModelError, CheckpointError)  # predict's error handling covers it


def test_bad_metadata_named(tmp_path, exported):
    proto = onnx.load(str(exported[1]))
    proto.metadata_props[0].value = json.dumps({"format": export.ONNX_FORMAT, "format_version": 99})
    path = tmp_path / "future.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(OnnxModelError, match="future.onnx: unusable 'bloodcell' metadata.*version 99"):
        read_onnx(path)


def test_cli(tmp_path, exported, capsys):
    out = tmp_path / "cli.onnx"
    assert cli_main(["export", "--checkpoint", str(exported[0]), "--out", str(out)]) == 0
    assert "opset 17" in capsys.readouterr().out and read_onnx(out)[1].class_names == CLASSES
    (tmp_path / "junk.pt").write_text("junk")
    assert export.main(["--checkpoint", str(tmp_path / "junk.pt"), "--out", str(out)]) == 2
    assert "junk.pt is not a bloodcell checkpoint" in capsys.readouterr().err
    assert export.main(["--checkpoint", str(exported[0]), "--opset", "3"]) == 2
    assert "--opset" in capsys.readouterr().err
    assert export.main(["--checkpoint", str(exported[0]), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
