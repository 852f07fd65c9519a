"""plots.py: every figure builds with the expected titles and axis labels; Grad-CAM heatmaps
are non-trivial and its target layer is found for each model family."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

from bloodcell_lib.reporting import plots  # noqa: E402
from bloodcell_lib.evaluation.metrics import compute_metrics  # noqa: E402
from bloodcell_lib.modeling.loaded import LoadedModel  # noqa: E402
from bloodcell_lib.modeling.models import create_model, resolve_data_config  # noqa: E402

CLASSES = ["eosinophil", "lymphocyte", "neutrophil"]


@pytest.fixture(scope="module")
def scored():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 20)
    logits = rng.normal(size=(60, 3)) + 2 * np.eye(3)[y]
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, proba, compute_metrics(y, proba, CLASSES)


@pytest.fixture(scope="module")
def image_rows(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(2)
    rows = []
    for c, name in enumerate(CLASSES):
        for i in range(3):
            arr = rng.integers(0, 200, (50, 60, 3), dtype=np.uint8)
            arr[15:35, 20:40, c] = 255
            path = root / f"{name}_{i}.png"
            Image.fromarray(arr).save(path)
            pred = name if i < 2 else CLASSES[(c + 1) % 3]
            rows.append({"path": str(path), "label": name, "predicted": pred, "confidence": 0.5 + 0.1 * i,
                         "split": "test" if i == 0 else "train", "box": (5, 5, 55, 45) if i == 1 else None})
    return pd.DataFrame(rows)


def titles(fig):
    return [ax.get_title() for ax in fig.axes]


def test_history(tmp_path):
    h = pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [1.0, 0.7, 0.5], "val_loss": [1.1, 0.8, 0.9],
                      "train_acc": [0.5, 0.7, 0.8], "val_acc": [0.4, 0.65, 0.6]})
    fig = plots.plot_history(h)
    assert isinstance(fig, Figure)
    loss, acc = fig.axes
    assert (loss.get_xlabel(), loss.get_ylabel(), acc.get_ylabel()) == ("epoch", "loss", "accuracy")
    assert [line.get_label() for line in loss.get_lines()][:2] == ["train", "validation"]
    assert len([l for l in acc.get_lines() if l.get_label() in ("train", "validation")]) == 2
    assert "Loss" in loss.get_title() and "Accuracy" in acc.get_title()
    out = plots.save_figure(fig, tmp_path / "sub" / "history.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [t for t in acc.texts if t.get_text().startswith("kept")]  # no kept epoch given, none marked
    # the kept checkpoint's epoch is marked, whatever chose it (here not the best val_acc)
    kept = plots.plot_history(h, kept_epoch=3).axes[1]
    assert [t.get_text() for t in kept.texts] == ["kept: val 0.600"]
    assert [line.get_xdata()[0] for line in kept.get_lines() if line.get_linestyle() == ":"] == [3]
    # history without validation columns still plots
    plots.plot_history(h[["epoch", "train_loss", "train_acc"]], kept_epoch=2)


def test_confusion(scored):
    _, _, m = scored
    counts = plots.plot_confusion(m["confusion_matrix"], CLASSES)
    ax = counts.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("Predicted class", "True class")
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES
    assert [t.get_text() for t in ax.get_yticklabels()] == CLASSES
    assert "counts" in ax.get_title()
    assert sum(int(float(t.get_text())) for t in ax.texts) == 60
    norm = plots.plot_confusion(m["confusion_matrix"], CLASSES, normalize=True).axes[0]
    assert "row-normalised" in norm.get_title()
    values = np.array([float(t.get_text()) for t in norm.texts]).reshape(3, 3)
    np.testing.assert_allclose(values.sum(1), 1, atol=0.02)
    with pytest.raises(ValueError, match="does not match"):
        plots.plot_confusion(np.eye(2), CLASSES)


def test_per_class_roc_reliability(scored):
    y, proba, m = scored
    ax = plots.plot_per_class(m).axes[0]
    assert len(ax.containers) == 3
    assert [t.get_text().split("\n")[0] for t in ax.get_xticklabels()] == CLASSES
    assert "precision" in ax.get_title() and ax.get_ylabel() == "score"
    roc = plots.plot_roc(y, proba, CLASSES).axes[0]
    assert (roc.get_xlabel(), roc.get_ylabel()) == ("False positive rate", "True positive rate")
    labels = [line.get_label() for line in roc.get_lines()]
    assert all(any(label.startswith(c) and "AUC" in label for label in labels) for c in CLASSES)
    # a class absent from y_true is named, not drawn
    roc2 = plots.plot_roc([0, 1, 0, 1], np.full((4, 3), 1 / 3), CLASSES).axes[0]
    assert any("neutrophil: n/a" in line.get_label() for line in roc2.get_lines())
    rel = plots.plot_reliability(m)
    assert f"ECE = {m['ece']:.3f}" in rel.axes[0].get_title()
    assert rel.axes[0].get_ylabel() == "Accuracy" and "Confidence" in rel.axes[1].get_xlabel()


def test_cross_lab_heatmap_leaves_unscored_cells_blank():
    rows = [{"experiment": "pbc", "test_source": "lisc", "accuracy": 0.25, "balanced_accuracy": 0.5, "macro_f1": 0.2},
            {"experiment": "pbc", "test_source": "bccd", "accuracy": 0.1, "balanced_accuracy": 0.3, "macro_f1": 0.1},
            {"experiment": "kaggle", "test_source": "lisc", "accuracy": 0.6, "balanced_accuracy": 0.7, "macro_f1": 0.5}]
    fig = plots.plot_cross_lab(rows)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["accuracy", "balanced accuracy", "macro f1"]
    texts = [t.get_text() for t in panels[1].texts]
    assert sorted(texts) == ["0.30", "0.50", "0.70"]  # kaggle x bccd: not scored, no number
    assert [t.get_text() for t in panels[0].get_xticklabels()] == ["lisc", "bccd"]
    with pytest.raises(ValueError, match="no cross-lab"):
        plots.plot_cross_lab([])


def test_misclassified(image_rows):
    fig = plots.plot_misclassified(image_rows, n=16)
    shown = [t for t in titles(fig) if t.startswith("true:")]
    assert len(shown) == 3  # one mistake per class
    assert shown[0] == "true: eosinophil\npred: lymphocyte (0.70)"  # ties keep table order
    assert "3 of 3 misclassified" in fig._suptitle.get_text()
    # custom loader, a failing image is shown as text, not raised
    def loader(path, box):
        raise OSError("gone")
    fig = plots.plot_misclassified(image_rows, n=2, load=loader)
    assert any("cannot show" in t.get_text() for ax in fig.axes for t in ax.texts)
    ok = image_rows.assign(predicted=image_rows["label"])
    assert "No misclassified" in plots.plot_misclassified(ok).axes[0].texts[0].get_text()


def test_explore_plots(image_rows):
    ax = plots.plot_class_counts(image_rows).axes[0]
    assert ax.get_legend().get_title().get_text() == "split"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "test"]
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("class", "images")
    no_split = image_rows.assign(split="")
    assert [t.get_text() for t in plots.plot_class_counts(no_split).axes[0].get_legend().get_texts()] == ["all"]
    for sizes in ([(320, 240)] * 3 + [(200, 200)], {"320x240": 3, (200, 200): 1},
                  pd.DataFrame({"width": [320, 320, 320, 200], "height": [240, 240, 240, 200]})):
        ax = plots.plot_image_sizes(sizes).axes[0]
        assert "4 images, 2 distinct sizes" in ax.get_title()
        assert ax.get_xlabel() == "width (pixels)"
    grid = plots.plot_sample_grid(image_rows, per_class=2)
    assert grid.axes[0].get_ylabel().startswith(CLASSES[0])
    assert sum(1 for ax in grid.axes if ax.images) == 6


@pytest.mark.parametrize("name, expected", [
    ("resnet18", lambda m: m.layer4[-1]),
    ("efficientnet_lite0", lambda m: m.bn2),
    ("efficientnet_b0", lambda m: m.features[-1]),
    ("alexnet", lambda m: m.features[11]),
    ("densenet121", lambda m: m.features.norm5),
])
def test_target_layer(name, expected):
    model = create_model(name, 3, pretrained=False)
    assert plots.find_target_layer(model, name) is expected(model)


def test_target_layer_generic_and_none():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    assert plots.find_target_layer(net) is net[2]
    with pytest.raises(ValueError, match="no Conv2d"):
        plots.find_target_layer(torch.nn.Linear(3, 2))


def _loaded(model, name, size):
    return LoadedModel(model, model_name=name, class_names=CLASSES, image_size=size,
                       data_config=dict(resolve_data_config(name, size), image_size=size))


@pytest.mark.parametrize("freeze", ["none", "backbone"])
def test_gradcam_maps_nontrivial(freeze):
    torch.manual_seed(0)
    model = create_model("resnet18", 3, pretrained=False, freeze=freeze).eval()
    x = torch.randint(0, 256, (3, 3, 96, 96), dtype=torch.uint8)
    maps = plots.gradcam_maps(_loaded(model, "resnet18", 96), x, targets=[0, 1, 2])
    assert maps.shape == (3, 96, 96) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
    assert maps.std() > 0.01 and all(m.max() > 0.5 for m in maps)  # a real heatmap, not constant
    assert all(p.grad is None for p in model.parameters())  # nothing left behind


def test_gradcam_figure(image_rows):
    torch.manual_seed(0)
    model = create_model("resnet18", 3, pretrained=False).eval()
    loaded = _loaded(model, "resnet18", 64)
    fig = plots.gradcam_figure(loaded, image_rows, per_class=2)
    assert "Grad-CAM" in fig._suptitle.get_text()
    assert len(fig.gradcam_maps) == 9  # 2 right + 1 wrong for each of 3 classes
    assert all(m.shape == (64, 64) for m in fig.gradcam_maps.values())
    shown = [t for t in titles(fig) if t]
    assert sum(t.startswith("right") for t in shown) == 6 and sum(t.startswith("wrong") for t in shown) == 3
    assert [ax.get_ylabel() for ax in fig.axes[::4]] == [f"true {c}" for c in CLASSES]
    # without predictions the model predicts the rows first
    fig2 = plots.gradcam_figure(loaded, image_rows[["path", "label"]], per_class=1)
    assert len(fig2.gradcam_maps) >= 1
