"""Export a checkpoint's model as a self-contained ONNX file, and read such files back.

The ONNX graph maps a normalised float32 batch [N, 3, S, S] (N free) to logits [N, K] and,
when the checkpoint holds a feature bank, to the k-NN OOD score [N] as a second output
(``modeling.neighbours.ScoredModel``: the bank is a constant of the graph).
Everything else prediction needs (class names, mean, std, image size, crop, crop margin,
the calibration of the checkpoint when it has one) travels inside the file as JSON in
the model's ``metadata_props`` under key ``bloodcell``, so the ``.onnx`` file alone can
classify pictures (``predict --checkpoint model.onnx``).

Command line::

    bloodcell export --checkpoint runs/x/checkpoint_best.pt [--out model.onnx] [--opset 17]

Exit codes: 0 ok, 2 bad arguments or checkpoint.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from bloodcell_lib.modeling.checkpoint import CheckpointError
from bloodcell_lib.modeling.loaded import LoadedModel, calibration_fields, load_checkpoint

ONNX_FORMAT = "bloodcell-onnx"
ONNX_FORMAT_VERSION = 1
METADATA_KEY = "bloodcell"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OOD_OUTPUT_NAME = "knn_distance"
DEFAULT_OPSET = 17
# Data-config keys that decide how a picture becomes the model's input.
PREPROCESS_KEYS = ("mean", "std", "image_size", "crop", "crop_margin", "crop_window", "interpolation", "color_norm")


class OnnxModelError(CheckpointError):
    """An .onnx file cannot be used for prediction; the message names the file and why."""


def onnx_metadata(loaded: LoadedModel, opset: int) -> dict[str, Any]:
    """The JSON stored in the ONNX file: what the loaded checkpoint says about preprocessing."""
    data_config = {key: loaded.data_config[key] for key in PREPROCESS_KEYS if key in loaded.data_config}
    data_config["mean"], data_config["std"] = list(data_config["mean"]), list(data_config["std"])
    return {"format": ONNX_FORMAT, "format_version": ONNX_FORMAT_VERSION, "opset": opset,
            "input": INPUT_NAME, "output": OUTPUT_NAME,
            "ood_output": OOD_OUTPUT_NAME if loaded.feature_bank is not None else None,
            "model_name": loaded.model_name, "class_names": list(loaded.class_names),
            "image_size": int(loaded.image_size), "data_config": data_config, "calibration": loaded.calibration,
            "review": loaded.review, "conformal": loaded.conformal,
            "source_checkpoint": Path(loaded.path).name, "epoch": loaded.epoch}


def onnx_bytes(model: torch.nn.Module, image_size: int, opset: int = DEFAULT_OPSET) -> bytes:
    """The model as a serialised ONNX graph with a dynamic batch axis (float32, CPU); a
    ``ScoredModel`` gets its k-NN score as a second output."""
    from bloodcell_lib.modeling.neighbours import ScoredModel

    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    outputs = [OUTPUT_NAME, OOD_OUTPUT_NAME] if isinstance(model, ScoredModel) else [OUTPUT_NAME]
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated but needs no onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (torch.zeros(1, 3, image_size, image_size),), buffer, dynamo=False,
                          opset_version=opset, input_names=[INPUT_NAME], output_names=outputs,
                          dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *outputs]})
    return buffer.getvalue()


def export_model(loaded: LoadedModel, *, opset: int = DEFAULT_OPSET) -> bytes:
    """A loaded checkpoint (``load_checkpoint``'s) as ONNX bytes with its metadata inside."""
    import onnx

    from bloodcell_lib.modeling.neighbours import scored

    proto = onnx.load_from_string(onnx_bytes(scored(loaded.model, loaded.feature_bank), loaded.image_size, opset))
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(onnx_metadata(loaded, opset))
    return proto.SerializeToString()


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike, *, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``checkpoint``'s model to ``out`` as ONNX (atomically); returns ``out``."""
    from bloodcell_lib.core.fileio import atomic_write_bytes

    data = export_model(load_checkpoint(checkpoint), opset=opset)
    atomic_write_bytes(Path(out), data)
    return Path(out)


def _metadata_of(path: Path, proto: Any) -> dict[str, Any]:
    props = {p.key: p.value for p in proto.metadata_props}
    if METADATA_KEY not in props:
        raise OnnxModelError(f"{path} is an ONNX model but not one exported by bloodcell (no {METADATA_KEY!r} "
                             "metadata: class names and preprocessing are unknown); "
                             "make one with `bloodcell export`")
    try:
        info = json.loads(props[METADATA_KEY])
        if info.get("format") != ONNX_FORMAT or info.get("format_version") != ONNX_FORMAT_VERSION:
            raise ValueError(f"format {info.get('format')!r} version {info.get('format_version')!r}, "
                             f"this version reads {ONNX_FORMAT!r} version {ONNX_FORMAT_VERSION}")
        for key in ("class_names", "image_size", "data_config"):
            info[key]  # noqa: B018 - KeyError names the missing key
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise OnnxModelError(f"{path}: unusable {METADATA_KEY!r} metadata ({type(err).__name__}: {err})") from err
    return info


def read_onnx(path: str | os.PathLike, *, calibrated: bool = True) -> tuple[bytes, LoadedModel]:
    """The bytes of a bloodcell ONNX file and what it says about the model (no torch network:
    the graph runs in an engine)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise OnnxModelError(f"ONNX model {path} does not exist or is not a file")
    data = path.read_bytes()
    try:
        proto = onnx.load_from_string(data)
        if not proto.graph.node:
            raise ValueError("the file holds no graph")
    except Exception as err:  # protobuf's DecodeError and friends: the file is not ONNX at all
        raise OnnxModelError(f"{path} is not an ONNX model ({type(err).__name__}: {str(err)[:200]})") from err
    info = _metadata_of(path, proto)
    data_config = dict(info["data_config"], image_size=int(info["image_size"]))
    loaded = LoadedModel(
        model=None, path=str(path), class_names=[str(c) for c in info["class_names"]],
        model_name=info.get("model_name"), data_config=data_config, image_size=int(info["image_size"]),
        epoch=info.get("epoch"), opset=info.get("opset"),
        feature_bank=None,  # inside the graph, if the model had one
        **calibration_fields(info.get("calibration"), info.get("review"), info.get("conformal"), calibrated,
                             len(proto.graph.output) > 1))
    return data, loaded


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bloodcell export",
        description="Write a checkpoint's model as ONNX (dynamic batch axis) with its class names and "
                    "preprocessing inside, so `predict --checkpoint FILE.onnx` needs nothing else.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint_best.pt (or _last.pt) of a run")
    parser.add_argument("--out", help="ONNX file to write (default: the checkpoint's name with .onnx)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # argparse: 0 for --help, 2 for bad arguments
        return int(exit_.code or 0)
    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(".onnx")
    if out.is_dir():
        print(f"error: --out {out} is a folder; give a .onnx file name", file=sys.stderr)
        return 2
    if not 9 <= args.opset <= 21:
        print(f"error: --opset must be between 9 and 21, got {args.opset}", file=sys.stderr)
        return 2
    try:
        export_onnx(args.checkpoint, out, opset=args.opset)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot write {out}: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, opset {args.opset}) from {args.checkpoint}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
