"""Figures for the notebooks and reports.

Every function returns a ``matplotlib.figure.Figure`` built without pyplot, so nothing is
drawn twice in a notebook, no global figure list grows in loops, and any backend (Agg in
tests) works. A Figure that is the last expression of a notebook cell is displayed; inside
a cell use ``display(fig)``. ``save_figure(fig, path)`` writes a PNG atomically.
"""
from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

if TYPE_CHECKING:  # plots imports torch only where a figure needs it
    from bloodcell_lib.modeling.loaded import LoadedModel

GOOD_COLOR = "#1a7f37"
BAD_COLOR = "#c62828"
SPLIT_ORDER = ("train", "val", "test", "test_simple", "all")


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig: Figure, path: str | os.PathLike, *, dpi: int = 120) -> Path:
    """Write ``fig`` as PNG (atomically: a reader never sees half a file)."""
    from bloodcell_lib.core.fileio import atomic_write_bytes

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(path, buffer.getvalue())


# --------------------------------------------------------------------------- training

def plot_history(history_df: pd.DataFrame, *, kept_epoch: int | None = None,
                 title: str = "Training history") -> Figure:
    """Loss (left) and accuracy (right) per epoch, train and validation on the same axes.

    Expects the run's history.csv columns: epoch, train_loss, val_loss, train_acc, val_acc
    (missing or empty columns are left out). ``kept_epoch``, the epoch of the checkpoint
    that was kept (``RunResult.best_epoch``), is marked with its validation accuracy.
    """
    h = pd.DataFrame(history_df)
    x = h["epoch"] if "epoch" in h else pd.Series(range(1, len(h) + 1))
    fig = _figure(11, 4)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, metric, label in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "accuracy")):
        for part, style in (("train", "-o"), ("val", "-s")):
            col = f"{part}_{metric}"
            if col in h and h[col].notna().any():
                ax.plot(x, h[col], style, markersize=3, label="train" if part == "train" else "validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(f"{label.capitalize()} per epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    kept = np.flatnonzero(np.asarray(x) == kept_epoch) if kept_epoch is not None else []
    if len(kept):
        kept_x = x.iloc[kept[0]]
        for ax in (ax_loss, ax_acc):
            ax.axvline(kept_x, color="grey", linestyle=":", linewidth=1)
        if "val_acc" in h and pd.notna(h["val_acc"].iloc[kept[0]]):
            kept_acc = h["val_acc"].iloc[kept[0]]
            ax_acc.annotate(f"kept: val {kept_acc:.3f}", (kept_x, kept_acc),
                            textcoords="offset points", xytext=(5, -12), fontsize=8)
    if len(x) and float(np.max(x)) <= 30:
        for ax in (ax_loss, ax_acc):
            ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    return fig


# --------------------------------------------------------------------------- evaluation

def plot_confusion(cm: Any, class_names: Sequence[str], normalize: bool = False, *,
                   title: str | None = None) -> Figure:
    """Confusion-matrix heatmap (rows = true class). ``normalize=True`` divides each row by
    its total, so the diagonal is per-class recall."""
    import seaborn as sns

    cm = np.asarray(cm, dtype=float)
    k = len(class_names)
    if cm.shape != (k, k):
        raise ValueError(f"confusion matrix shape {cm.shape} does not match {k} class names")
    if normalize:
        totals = cm.sum(axis=1, keepdims=True)
        data = np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)
        fmt, cbar_label = ".2f", "fraction of true class"
    else:
        data, fmt, cbar_label = cm, ".0f", "images"
    size = max(4.5, 0.65 * k + 2.5)
    fig = _figure(size + 1, size)
    ax = fig.subplots()
    sns.heatmap(data, annot=k <= 20, fmt=fmt, cmap="Blues", square=True, ax=ax,
                xticklabels=class_names, yticklabels=class_names,
                vmin=0, vmax=1 if normalize else None, cbar_kws={"label": cbar_label})
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.tick_params(axis="x", labelrotation=45)
    ax.tick_params(axis="y", labelrotation=0)
    n = int(cm.sum())
    ax.set_title(title or (f"Confusion matrix, row-normalised (recall on the diagonal), n={n}"
                           if normalize else f"Confusion matrix (counts), n={n}"))
    return fig


def plot_per_class(metrics: dict[str, Any], *, title: str = "Per-class precision, recall and F1") -> Figure:
    """Grouped bars of precision, recall and F1 per class (support in the tick labels)."""
    per_class = metrics["per_class"]
    names = list(per_class)
    k = len(names)
    fig = _figure(max(6.0, 1.1 * k + 2), 4.2)
    ax = fig.subplots()
    width = 0.26
    pos = np.arange(k)
    for i, (key, color) in enumerate((("precision", "#4c72b0"), ("recall", "#dd8452"), ("f1", "#55a868"))):
        values = [per_class[c][key] for c in names]
        bars = ax.bar(pos + (i - 1) * width, values, width, label="F1" if key == "f1" else key, color=color)
        if k <= 12:
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.set_xticks(pos, [f"{c}\n(n={per_class[c]['support']})" for c in names], rotation=30 if k > 6 else 0)
    ax.set_xlabel("class")
    ax.set_ylabel("score")
    ax.set_ylim(0, 1.1)
    if "macro_f1" in metrics:
        ax.axhline(metrics["macro_f1"], color="grey", linestyle="--", linewidth=1,
                   label=f"macro F1 {metrics['macro_f1']:.3f}")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title)
    return fig


def plot_roc(y_true: Any, proba: Any, class_names: Sequence[str], *,
             title: str = "One-vs-rest ROC curves") -> Figure:
    """One ROC curve per class (that class against the rest), AUC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    from bloodcell_lib.evaluation.metrics import label_indices

    class_names = list(class_names)
    y = label_indices(y_true, class_names)
    p = np.asarray(proba, dtype=float)
    fig = _figure(6.5, 5.5)
    ax = fig.subplots()
    colors = [f"C{i % 10}" for i in range(len(class_names))]
    for j, name in enumerate(class_names):
        positives = y == j
        if not positives.any() or positives.all():
            ax.plot([], [], color=colors[j], label=f"{name}: n/a (no {'positives' if not positives.any() else 'negatives'})")
            continue
        fpr, tpr, _ = roc_curve(positives.astype(int), p[:, j])
        auc = roc_auc_score(positives.astype(int), p[:, j])
        ax.plot(fpr, tpr, color=colors[j], label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title)
    return fig


def plot_reliability(metrics: dict[str, Any], *, title: str | None = None) -> Figure:
    """Reliability diagram: accuracy against mean confidence per bin, with ECE in the title;
    a histogram of bin counts below."""
    bins = metrics["reliability"]
    lower = np.array([b["lower"] for b in bins])
    upper = np.array([b["upper"] for b in bins])
    centers, width = (lower + upper) / 2, upper - lower
    counts = np.array([b["count"] for b in bins])
    acc = np.array([b["accuracy"] if b["count"] else 0.0 for b in bins])
    conf = np.array([b["confidence"] if b["count"] else 0.0 for b in bins])
    filled = counts > 0
    fig = _figure(5.5, 6.5)
    ax, ax_n = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.bar(centers[filled], acc[filled], width[filled], edgecolor="black", color="#4c72b0", label="accuracy")
    ax.bar(centers[filled], (conf - acc)[filled], width[filled], bottom=acc[filled], facecolor="none",
           edgecolor="#c44e52", hatch="//", linewidth=1, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or f"Reliability diagram (ECE = {metrics['ece']:.3f}, {len(bins)} bins, n={metrics.get('n', counts.sum())})")
    ax_n.bar(centers, counts, width, color="grey", edgecolor="black")
    ax_n.set_xlabel("Confidence (max softmax probability)")
    ax_n.set_ylabel("images")
    return fig


def plot_cross_lab(rows: Sequence[dict[str, Any]], *,
                   metrics: Sequence[str] = ("accuracy", "balanced_accuracy", "macro_f1")) -> Figure:
    """Train experiment x test source heatmaps, one panel per metric, of cross-lab records
    (``crosslab.record_fields``' ``cross_lab``: experiment, test_source, the metrics, n, unit);
    a source an experiment was not scored on stays blank."""
    import seaborn as sns

    frame = pd.DataFrame(rows)
    if frame.empty:
        raise ValueError("no cross-lab scores to plot")
    experiments = list(dict.fromkeys(frame["experiment"]))
    sources = list(dict.fromkeys(frame["test_source"]))
    fig = _figure(max(4.0, 1.3 * len(sources) + 2.2) * len(metrics), 0.6 * len(experiments) + 2.2)
    for ax, metric in zip(np.atleast_1d(fig.subplots(1, len(metrics))), metrics):
        data = frame.pivot_table(index="experiment", columns="test_source", values=metric).reindex(
            index=experiments, columns=sources)
        sns.heatmap(data, annot=True, fmt=".2f", cmap="RdYlGn", vmin=0, vmax=1, ax=ax, cbar=metric == metrics[-1])
        ax.set_title(metric.replace("_", " "))
        ax.set_xlabel("test source (other lab)")
        ax.set_ylabel("trained experiment" if metric == metrics[0] else "")
        ax.tick_params(axis="x", labelrotation=30)
        ax.tick_params(axis="y", labelrotation=0)
    fig.suptitle("Cross-lab scores on the shared classes (kaggle-test counted per cell)")
    return fig


def plot_label_budget(table: pd.DataFrame, *, title: str = "Label budget: suggested against random cells") -> Figure:
    """Balanced accuracy against the label budget (cells labelled in all), one panel per lab, of
    ``label_budget``'s tidy table (lab, budget, chooser, draw, balanced_accuracy): the suggested
    cells' line, the random draws as dots and their mean as a dashed line."""
    frame = pd.DataFrame(table)
    if frame.empty:
        raise ValueError("no label-budget scores to plot")
    labs = list(dict.fromkeys(frame["lab"]))
    fig = _figure(4.2 * len(labs) + 0.6, 3.8)
    for ax, lab in zip(np.atleast_1d(fig.subplots(1, len(labs), sharey=True)), labs):
        part = frame[frame["lab"] == lab]
        chosen = part[part["chooser"] == "suggested"].sort_values("budget")
        drawn = part[part["chooser"] == "random"]
        mean = drawn.groupby("budget")["balanced_accuracy"].mean()
        ax.plot(drawn["budget"], drawn["balanced_accuracy"], "o", color="#999999", alpha=0.6, markersize=4,
                label="random draws")
        ax.plot(mean.index, mean.to_numpy(), "--o", color="#4c72b0", label="random (mean of draws)")
        ax.plot(chosen["budget"], chosen["balanced_accuracy"], "-o", color=GOOD_COLOR, label="suggested")
        budgets = sorted(part["budget"].unique())
        ax.set_xscale("log")
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("labelled cells (in all)")
        ax.set_title(f"held-out lab: {lab}")
        ax.grid(alpha=0.3)
    fig.axes[0].set_ylabel("balanced accuracy (cells not labelled)")
    fig.axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    return fig


# --------------------------------------------------------------------------- galleries

def _row_box(row: Any) -> tuple[float, float, float, float] | None:
    """A crop box from a row: column ``box`` (tuple or "(a, b, c, d)" text) or xmin..ymax."""
    get = row.get if hasattr(row, "get") else (lambda k, d=None: getattr(row, k, d))
    box = get("box", None)
    if isinstance(box, float) and math.isnan(box):
        box = None
    if isinstance(box, str) and box.strip():
        box = tuple(float(v) for v in box.strip("()[] ").split(","))
    if isinstance(box, (tuple, list, np.ndarray)) and len(box) == 4:
        return tuple(float(v) for v in box)
    coords = [get(k, None) for k in ("xmin", "ymin", "xmax", "ymax")]
    if all(c is not None and not pd.isna(c) for c in coords):
        return tuple(float(c) for c in coords)
    return None


def _default_loader(path: str, box: Any = None):
    from bloodcell_lib.data.images import load_rgb

    return load_rgb(path, box)


def _show_image(ax, row: Any, load: Callable, title: str, color: str = "black") -> None:
    try:
        img = load(row["path"], _row_box(row))
        ax.imshow(np.asarray(img))
    except Exception as err:  # the gallery shows what failed instead of stopping the notebook
        ax.text(0.5, 0.5, f"cannot show\n{Path(str(row['path'])).name}\n{str(err)[-60:]}",
                ha="center", va="center", fontsize=6, wrap=True, transform=ax.transAxes)
    ax.set_title(title, fontsize=8, color=color)
    ax.set_xticks([])
    ax.set_yticks([])


def _grid(n: int, ncols: int, cell: float = 2.2) -> tuple[Figure, np.ndarray]:
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig = _figure(cell * ncols, cell * nrows + 0.5)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    return fig, axes


def plot_misclassified(predictions_df: pd.DataFrame, n: int = 16, load: Callable | None = None, *,
                       ncols: int = 4, title: str | None = None) -> Figure:
    """Gallery of the ``n`` most confident mistakes: true class, predicted class, confidence.

    ``predictions_df``: columns path, label, predicted, confidence (e.g. evaluation's
    predictions_test.csv), optionally box or xmin/ymin/xmax/ymax for cell crops.
    ``load(path, box) -> PIL image`` defaults to ``images.load_rgb``.
    """
    load = load or _default_loader
    df = pd.DataFrame(predictions_df)
    wrong = df[df["label"].astype(str) != df["predicted"].astype(str)]
    total_wrong = len(wrong)
    if "confidence" in wrong:
        wrong = wrong.sort_values("confidence", ascending=False, kind="stable")
    wrong = wrong.head(n)
    if wrong.empty:
        fig = _figure(5, 1.5)
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, f"No misclassified images among {len(df)}", ha="center", va="center")
        ax.set_title(title or "Misclassified images")
        return fig
    fig, axes = _grid(len(wrong), ncols)
    for ax, (_, row) in zip(axes, wrong.iterrows()):
        ax.axis("on")
        conf = f" ({row['confidence']:.2f})" if "confidence" in row else ""
        _show_image(ax, row, load, f"true: {row['label']}\npred: {row['predicted']}{conf}", BAD_COLOR)
    fig.suptitle(title or f"Most confident mistakes: {len(wrong)} of {total_wrong} misclassified (of {len(df)})")
    return fig


# --------------------------------------------------------------------------- Grad-CAM

_ACTIVATIONS = ("ReLU", "ReLU6", "SiLU", "GELU", "Hardswish", "LeakyReLU", "ELU", "Mish", "Sigmoid")
_NORMS = ("BatchNorm2d", "GroupNorm", "LayerNorm2d", "BatchNormAct2d", "SyncBatchNorm")


def find_target_layer(model: Any, model_name: str | None = None):
    """The layer whose activations Grad-CAM weights: the last convolutional feature map.

    ResNet: ``layer4[-1]``; timm EfficientNet (-lite): ``bn2`` (the head conv after its
    BatchNorm+activation) or ``conv_head``; torchvision EfficientNet/MobileNet/ConvNeXt:
    ``features[-1]``; DenseNet: ``features.norm5``; otherwise (AlexNet, VGG, ...) the last Conv2d, moved past the
    normalisation/activation layers that directly follow it in the same Sequential, so
    the map is post-activation and no in-place ReLU rewrites the hooked tensor.
    """
    import torch.nn as nn

    if hasattr(model, "layer4") and isinstance(model.layer4, nn.Sequential) and len(model.layer4):
        return model.layer4[-1]
    if hasattr(model, "conv_head") and isinstance(model.conv_head, nn.Conv2d):
        bn2 = getattr(model, "bn2", None)
        if bn2 is not None and hasattr(bn2, "act"):  # timm BatchNormAct2d: BN + activation
            return bn2
        return model.conv_head
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential) and len(features):
        last = features[-1]
        if any(isinstance(m, nn.Conv2d) for m in last.modules()) and not isinstance(last, nn.Conv2d):
            return last  # torchvision efficientnet / mobilenet / convnext: the last block
        if type(last).__name__ in _NORMS:
            return last  # densenet: norm5 after the last dense block
        # alexnet / vgg end in pooling: fall through to the last Conv2d and its activation
    # generic: last Conv2d, then the norm/activation layers right after it
    parents = {}
    for parent in model.modules():
        for child_name, child in parent.named_children():
            parents[id(child)] = (parent, child_name)
    last_conv = None
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            last_conv = module
    if last_conv is None:
        raise ValueError(f"no Conv2d layer in model {model_name or type(model).__name__}; "
                         "pass target_layer explicitly")
    target = last_conv
    parent, child_name = parents.get(id(last_conv), (None, None))
    if isinstance(parent, nn.Sequential):
        children = list(parent)
        i = [id(c) for c in children].index(id(last_conv))
        for nxt in children[i + 1:]:
            if type(nxt).__name__ in _ACTIVATIONS + _NORMS:
                target = nxt
            else:
                break
    return target


def gradcam_maps(loaded: LoadedModel, images_uint8: Any, targets: Sequence[int] | None = None, *,
                 target_layer: Any = None, batch_size: int = 16) -> np.ndarray:
    """Grad-CAM heatmaps in [0, 1], float32 [N, S, S], for uint8 images [N, 3, S, S].

    ``targets``: class index per image to explain (default: the predicted class).
    """
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from bloodcell_lib.data.transforms import normalize_batch

    x_all = torch.as_tensor(images_uint8)
    model = loaded.model
    layer = target_layer if target_layer is not None else find_target_layer(model, loaded.model_name)
    was_training = model.training
    cam = GradCAM(model=model, target_layers=[layer])
    maps = []
    try:
        with torch.enable_grad():
            for start in range(0, len(x_all), batch_size):
                x = normalize_batch(x_all[start:start + batch_size], loaded.data_config,
                                    loaded.channels_last).detach().clone()
                x.requires_grad_(True)  # gradients reach the layer even in a frozen backbone
                tg = None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets[start:start + len(x)]]
                maps.append(np.asarray(cam(input_tensor=x, targets=tg), dtype=np.float32))
    finally:
        cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if not maps:
        size = loaded.image_size
        return np.zeros((0, size, size), dtype=np.float32)
    return np.concatenate(maps)


def _select_gradcam_rows(rows: pd.DataFrame, class_names: Sequence[str], per_class: int) -> list[tuple[str, pd.DataFrame]]:
    """Per class: the ``per_class`` most confident right and wrong predictions of that true class."""
    out = []
    for name in class_names:
        of_class = rows[rows["label"].astype(str) == name]
        by_conf = (lambda d: d.sort_values("confidence", ascending=False, kind="stable")) if "confidence" in rows else (lambda d: d)
        right = by_conf(of_class[of_class["predicted"].astype(str) == name]).head(per_class)
        wrong = by_conf(of_class[of_class["predicted"].astype(str) != name]).head(per_class)
        out.append((name, pd.concat([right, wrong])))
    return out


def gradcam_figure(loaded: LoadedModel, rows: pd.DataFrame, per_class: int = 2, *,
                   target_layer: Any = None, load: Callable | None = None,
                   title: str | None = None) -> Figure:
    """Grad-CAM overlays for up to ``per_class`` right and ``per_class`` wrong predictions of
    each true class (most confident first), explaining the predicted class.

    ``rows``: path, label and (ideally) predicted, confidence, box columns, e.g. the
    evaluation's predictions. Without ``predicted``, the model predicts ``rows`` first (pass a
    sample). The heatmaps are attached as ``fig.gradcam_maps`` ({path: [S, S] array}).
    """
    import torch
    from pytorch_grad_cam.utils.image import show_cam_on_image

    from bloodcell_lib.evaluation.predict import predict_tensors, prediction_frame
    from bloodcell_lib.data.transforms import pil_to_uint8

    load = load or _default_loader
    class_names = list(loaded.class_names)
    size = loaded.image_size
    df = pd.DataFrame(rows).reset_index(drop=True)

    def to_uint8(row) -> torch.Tensor | None:
        try:
            return pil_to_uint8(load(row["path"], _row_box(row)), size)
        except Exception:
            return None

    if "predicted" not in df:
        tensors = [to_uint8(r) for _, r in df.iterrows()]
        keep = [i for i, t in enumerate(tensors) if t is not None]
        df = df.iloc[keep].reset_index(drop=True)
        proba = predict_tensors(loaded, torch.stack([tensors[i] for i in keep]) if keep
                                else torch.zeros((0, 3, size, size), dtype=torch.uint8))
        pred = prediction_frame(list(df["path"]), proba, class_names)
        df["predicted"], df["confidence"] = pred["predicted"], pred["confidence"]

    groups = _select_gradcam_rows(df, class_names, per_class)
    ncols = 2 * per_class
    nrows = len(class_names)
    fig = _figure(2.2 * ncols + 0.6, 2.3 * nrows + 0.6)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    fig.gradcam_maps = {}
    for r, (name, chosen) in enumerate(groups):
        axes[r, 0].set_ylabel(f"true {name}", fontsize=9)
        items = [(row, to_uint8(row)) for _, row in chosen.iterrows()]
        items = [(row, t) for row, t in items if t is not None]
        if not items:
            axes[r, 0].text(0.5, 0.5, "no images", ha="center", va="center", fontsize=8,
                            transform=axes[r, 0].transAxes)
            continue
        x = torch.stack([t for _, t in items])
        tgt = [class_names.index(str(row["predicted"])) for row, _ in items]
        maps = gradcam_maps(loaded, x, tgt, target_layer=target_layer)
        right = [(row, t, m) for (row, t), m in zip(items, maps) if str(row["predicted"]) == name]
        wrong = [(row, t, m) for (row, t), m in zip(items, maps) if str(row["predicted"]) != name]
        for col, group, what in ((0, right, "no correct\npredictions"), (per_class, wrong, "no mistakes")):
            if not group:
                axes[r, col].text(0.5, 0.5, what, ha="center", va="center", fontsize=8, color="grey",
                                  transform=axes[r, col].transAxes)
        slots = [(i, v) for i, v in enumerate(right)] + [(per_class + i, v) for i, v in enumerate(wrong)]
        for c, (row, t, m) in slots:
            rgb = t.permute(1, 2, 0).numpy().astype(np.float32) / 255.0
            axes[r, c].imshow(show_cam_on_image(rgb, m, use_rgb=True))
            ok = str(row["predicted"]) == name
            conf = f" {row['confidence']:.2f}" if "confidence" in row and pd.notna(row["confidence"]) else ""
            axes[r, c].set_title(f"{'right' if ok else 'wrong'}: pred {row['predicted']}{conf}", fontsize=8,
                                 color=GOOD_COLOR if ok else BAD_COLOR)
            fig.gradcam_maps[str(row["path"])] = m
    fig.suptitle(title or f"Grad-CAM ({loaded.model_name}): evidence for the predicted class\n"
                          f"per true class, up to {per_class} right (green) and {per_class} wrong (red), most confident first")
    return fig


# --------------------------------------------------------------------------- exploration

def plot_class_counts(table: pd.DataFrame, *, title: str = "Images per class and split") -> Figure:
    """Bar chart of images per class, one bar colour per split (``all`` when no split)."""
    df = pd.DataFrame(table)
    split = df["split"].fillna("").astype(str).replace("", "all") if "split" in df else pd.Series("all", index=df.index)
    counts = pd.crosstab(df["label"].astype(str), split)
    order = [s for s in SPLIT_ORDER if s in counts.columns] + sorted(c for c in counts.columns if c not in SPLIT_ORDER)
    counts = counts[order]
    k = len(counts)
    fig = _figure(max(6.0, 0.9 * k + 2), 4.2)
    ax = fig.subplots()
    width = 0.8 / max(1, len(order))
    pos = np.arange(k)
    for i, s in enumerate(order):
        bars = ax.bar(pos + (i - (len(order) - 1) / 2) * width, counts[s].values, width, label=s)
        if k * len(order) <= 40:
            ax.bar_label(bars, fontsize=7, padding=1)
    ax.set_xticks(pos, counts.index, rotation=30 if k > 6 else 0)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("class")
    ax.set_ylabel("images")
    ax.legend(title="split")
    ax.set_title(f"{title} (n={len(df)})")
    return fig


def plot_image_sizes(sizes: Any, *, title: str = "Image sizes (width x height)") -> Figure:
    """Scatter of image width against height, marker area by how many images share a size.

    ``sizes``: DataFrame with width/height columns, a list of (width, height) pairs, or a
    dict {(width, height): count} / {"WxH": count} as in an audit.
    """
    if isinstance(sizes, pd.DataFrame):
        pairs = pd.DataFrame({"width": sizes["width"], "height": sizes["height"]}).dropna()
        counts = pairs.value_counts().rename("count").reset_index()
    elif isinstance(sizes, dict):
        rows = []
        for key, cnt in sizes.items():
            w, h = (int(v) for v in (key.lower().split("x") if isinstance(key, str) else key))
            rows.append((w, h, int(cnt)))
        counts = pd.DataFrame(rows, columns=["width", "height", "count"])
    else:
        pairs = pd.DataFrame([tuple(s) for s in sizes if s is not None], columns=["width", "height"])
        counts = pairs.value_counts().rename("count").reset_index()
    fig = _figure(6.5, 5)
    ax = fig.subplots()
    if counts.empty:
        ax.text(0.5, 0.5, "no sizes", ha="center", va="center", transform=ax.transAxes)
    else:
        area = 20 + 400 * np.sqrt(counts["count"] / counts["count"].max())
        ax.scatter(counts["width"], counts["height"], s=area, alpha=0.6, edgecolor="black")
        for row in counts.nlargest(6, "count").itertuples():
            ax.annotate(f"{row.width}x{row.height}: {row.count}", (row.width, row.height), fontsize=7,
                        textcoords="offset points", xytext=(6, 6))
        lo = 0
        hi = max(counts["width"].max(), counts["height"].max()) * 1.1
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    ax.set_xlabel("width (pixels)")
    ax.set_ylabel("height (pixels)")
    n = int(counts["count"].sum()) if not counts.empty else 0
    ax.set_title(f"{title}, {n} images, {len(counts)} distinct sizes")
    ax.grid(alpha=0.3)
    return fig


def plot_sample_grid(table: pd.DataFrame, per_class: int = 6, *, seed: int = 0, load: Callable | None = None,
                     title: str = "Sample images per class") -> Figure:
    """``per_class`` random images (seeded) of each class, one class per row; crop boxes applied."""
    load = load or _default_loader
    df = pd.DataFrame(table)
    classes = sorted(df["label"].astype(str).unique())
    fig = _figure(1.9 * per_class + 1, 2.0 * max(1, len(classes)) + 0.5)
    axes = fig.subplots(max(1, len(classes)), per_class, squeeze=False)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    for r, name in enumerate(classes):
        of_class = df[df["label"].astype(str) == name]
        sample = of_class.sample(n=min(per_class, len(of_class)), random_state=seed)
        axes[r, 0].set_ylabel(f"{name}\n(n={len(of_class)})", fontsize=9)
        for c, (_, row) in enumerate(sample.iterrows()):
            _show_image(axes[r, c], row, load, Path(str(row["path"])).name[:22])
    fig.suptitle(title)
    return fig


def plot_risk_coverage(predictions_df: pd.DataFrame, review: dict[str, Any] | None = None, *,
                       title: str = "Risk-coverage: accepting the most confident cells") -> Figure:
    """Accuracy of the accepted cells against the share accepted (most confident first),
    with the review threshold's operating point when the checkpoint has one."""
    from bloodcell_lib.modeling.review import risk_coverage

    correct = (predictions_df["predicted"] == predictions_df["label"]).to_numpy()
    curve = risk_coverage(predictions_df["confidence"].to_numpy(), correct)
    fig = _figure(6.0, 4.2)
    ax = fig.subplots()
    ax.plot(curve["coverage"], curve["accuracy"], color="#4c72b0", label="accepted cells")
    if review and review.get("coverage") is not None and review.get("accuracy_accepted") is not None:
        ax.plot([review["coverage"]], [review["accuracy_accepted"]], "o", color="#c44e52",
                label=f"review flags: coverage {review['coverage']:.3f}, accuracy {review['accuracy_accepted']:.4f}")
    ax.set_xlabel("Coverage (share of cells accepted)")
    ax.set_ylabel("Accuracy of accepted cells")
    ax.set_xlim(0, 1)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(title)
    return fig
