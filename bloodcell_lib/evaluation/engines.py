"""Inference engines: one small class per runtime, each with ``run(batch, knn) -> (logits, knn)``,
and the LoadedModel it runs (``engine.loaded``: class names, input contract, calibration).

``batch`` is the normalised float32 tensor [N, 3, S, S] on ``engine.device`` that
``predict.scored_views`` makes from decoded pictures (the same decode, crop, resize and
normalisation for every engine; ``engine.channels_last`` says which memory format it wants);
``run`` returns float32 logits [N, K] and, when the model carries a feature bank, the k-NN
OOD score [N] computed in the same graph (``modeling.neighbours.ScoredModel``), else None;
with ``knn=False`` the torch engine skips that score (an ONNX graph computes its outputs either way).
``open_engine`` turns a ``.pt`` checkpoint or an exported ``.onnx`` file into an engine; a
``.pt`` checkpoint given to an ONNX runtime is exported in memory first (a few seconds);
``export`` makes the file once. ``as_engine`` runs a LoadedModel as it is, on torch.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from bloodcell_lib.evaluation.export import export_model, read_onnx
from bloodcell_lib.modeling.loaded import LoadedModel, load_checkpoint
from bloodcell_lib.modeling.neighbours import scored

# Preference order, the default being the first installed. ONNX Runtime had the lower batch-1
# latency in both runs of docs/engines.md, while batch-64 throughput ranked ONNX Runtime and
# OpenVINO differently in the two (busy machine); OpenVINO is optional, not a dependency.
ENGINE_NAMES = ("onnxruntime", "openvino", "torch")
_MODULES = {"openvino": "openvino", "onnxruntime": "onnxruntime", "torch": "torch"}


class EngineError(ValueError):
    """An engine cannot be used as asked; the message names the engine or file and why."""


class TorchEngine:
    """PyTorch eager on the device of the LoadedModel's network (the reference the others are
    compared with). The network is put in eval mode for each batch and left as it was found,
    so a model being adapted can be scored between steps."""

    name = "torch"

    def __init__(self, loaded: LoadedModel):
        if loaded.model is None:
            raise EngineError(f"engine torch needs a .pt checkpoint; {loaded.path} has no torch model")
        self.loaded = loaded
        self.device = next(loaded.model.parameters()).device
        self.channels_last = loaded.channels_last
        # built once: the graph with the k-NN score, used when the caller wants that score;
        # scored() leaves the network in eval mode, and a model being adapted must stay as it was
        was_training = loaded.model.training
        self.with_knn = scored(loaded.model, loaded.feature_bank)
        loaded.model.train(was_training)

    @torch.inference_mode()
    def run(self, batch: torch.Tensor, knn: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        model = self.loaded.model
        was_training = model.training
        model.eval()
        try:
            out = (self.with_knn if knn else model)(batch.to(self.device))
        finally:
            model.train(was_training)
        if isinstance(out, tuple):
            return out[0].float().cpu().numpy(), out[1].float().cpu().numpy()
        return out.float().cpu().numpy(), None


class OnnxRuntimeEngine:
    """ONNX Runtime's CPU execution provider, all graph optimisations on."""

    name = "onnxruntime"
    device = torch.device("cpu")
    channels_last = False

    def __init__(self, loaded: LoadedModel, onnx_model: bytes, threads: int = 0):
        import onnxruntime as ort

        self.loaded = loaded

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads  # 0: one per physical core
        # Idle threads sleep instead of spinning: on a shared machine spinning steals the
        # cores that decode the next batch (and other people's work).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def run(self, batch: torch.Tensor, knn: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """``knn`` is ignored: the graph computes its outputs either way."""
        outputs = self.session.run(None, {self.input_name: batch.contiguous().numpy()})
        return outputs[0], (outputs[1] if len(outputs) > 1 else None)


class OpenVinoEngine:
    """OpenVINO on the CPU, compiled for latency (one request uses every core) in float32:
    its CPU default may be bfloat16, which moves logits by ~1e-2 and so flips some top-1s."""

    name = "openvino"
    device = torch.device("cpu")
    channels_last = False

    def __init__(self, loaded: LoadedModel, onnx_model: bytes, threads: int = 0):
        import io

        import openvino as ov

        self.loaded = loaded

        core = ov.Core()
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(core.read_model(io.BytesIO(onnx_model)), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def run(self, batch: torch.Tensor, knn: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """``knn`` is ignored: the graph computes its outputs either way."""
        result = self.request.infer([batch.contiguous().numpy()])
        outputs = [np.array(result[i], dtype=np.float32, copy=True) for i in range(len(self.compiled.outputs))]
        return outputs[0], (outputs[1] if len(outputs) > 1 else None)


def available_engines() -> list[str]:
    """Engine names whose runtime is installed, fastest first."""
    return [name for name in ENGINE_NAMES if importlib.util.find_spec(_MODULES[name]) is not None]


def default_engine(device: str = "cpu") -> str:
    """The fastest installed engine; torch when the model is to run on an accelerator."""
    return "torch" if torch.device(device).type != "cpu" else available_engines()[0]


def is_onnx_path(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".onnx"


Engine = Union[TorchEngine, OnnxRuntimeEngine, OpenVinoEngine]


def _onnx_engine(name: str, loaded: LoadedModel, onnx_model: bytes, threads: int) -> OnnxRuntimeEngine | OpenVinoEngine:
    cls = OnnxRuntimeEngine if name == "onnxruntime" else OpenVinoEngine
    try:
        return cls(loaded, onnx_model, threads)
    except Exception as err:  # the runtimes' own errors run to pages; one line says enough
        text = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise EngineError(f"engine {name} cannot load the model ({type(err).__name__}: {text[:300]})") from err


def open_engine(checkpoint: str | os.PathLike, engine: str | None = None, *, device: str = "cpu",
                threads: int = 0, calibrated: bool = True) -> Engine:
    """The engine running a ``.pt`` checkpoint or an exported ``.onnx`` file.

    ``engine``: one of ENGINE_NAMES, or None for ``default_engine(device)``. Raises
    ``CheckpointError`` for an unusable file, EngineError for an engine that is not
    installed or cannot run this file.
    """
    name = _checked_engine(engine, device)
    if is_onnx_path(checkpoint):
        if name == "torch":
            raise EngineError(f"engine torch needs a .pt checkpoint; {checkpoint} is ONNX: "
                              "use --engine onnxruntime or openvino")
        onnx_model, loaded = read_onnx(checkpoint, calibrated=calibrated)
        return _onnx_engine(name, loaded, onnx_model, threads)
    return engine_for_model(load_checkpoint(checkpoint, device, calibrated=calibrated), name,
                            device=device, threads=threads)


def engine_for_model(loaded: LoadedModel, engine: str | None = None, *,
                     device: str = "cpu", threads: int = 0) -> Engine:
    """The engine running a loaded model (``load_checkpoint``'s, possibly adapted since)."""
    name = _checked_engine(engine, device)
    if name == "torch":
        return TorchEngine(loaded)
    return _onnx_engine(name, loaded, export_model(loaded), threads)


def as_engine(runner: LoadedModel | Engine) -> Engine:
    """``runner`` itself when it is an engine, else its network on torch, as it is now."""
    return TorchEngine(runner) if isinstance(runner, LoadedModel) else runner


def _checked_engine(engine: str | None, device: str) -> str:
    name = engine or default_engine(device)
    if name not in ENGINE_NAMES:
        raise EngineError(f"engine {name!r} is not known; use one of: {', '.join(ENGINE_NAMES)}")
    if name not in available_engines():
        raise EngineError(f"engine {name} is not installed (pip install {name}); installed: "
                          f"{', '.join(available_engines())}")
    if name != "torch" and torch.device(device).type != "cpu":
        raise EngineError(f"engine {name} runs on the CPU here; use --engine torch for device {device}")
    return name
