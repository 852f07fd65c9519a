"""Adapting a model to one lab's unlabelled cells: the model-level math. AdaBN (Li et al. 2016),
its class-balanced variant, T3A's prototype classifier (Iwasawa & Matsuo 2021), SHOT-IM
(Liang et al. 2020) and the collapse guard; ``evaluation.unlabelled_adapt`` applies them to
a folder's cells (docs/adapting.md).

A model trained on one lab's smears sees another lab's colour cast and scale as a shift of
its feature statistics; BatchNorm layers normalise with the training lab's running means and
variances, so every later layer gets inputs it never saw. Replacing those statistics by the
new lab's (forward passes only, no labels, no gradient) undoes much of the shift while every
learned weight stays as it was.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from bloodcell_lib.modeling.loaded import LoadedModel

_BatchNorm = nn.modules.batchnorm._BatchNorm


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer that keeps running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def adapt_batchnorm(loaded: LoadedModel, images_uint8: Any, *,
                    batch_size: int = 64) -> dict[str, int]:
    """Replace the running mean/variance of every BatchNorm layer of ``loaded.model`` (in place) by
    the statistics of ``images_uint8`` (uint8 [N, 3, S, S], as ``transforms.pil_to_uint8``
    makes them; ``loaded`` from ``modeling.loaded.load_checkpoint``). Returns {n_images, n_layers}.

    Only the BatchNorm layers run in train mode (dropout and everything else stay in eval);
    momentum None makes each layer keep the cumulative average over all batches, so the
    result does not depend on batch order. Weights and biases are never touched.
    """
    from bloodcell_lib.data.transforms import normalize_batch

    model = loaded.model
    x_all = torch.as_tensor(images_uint8)
    if x_all.ndim != 4 or x_all.shape[1] != 3 or x_all.dtype != torch.uint8:
        raise ValueError(f"adaptation images must be uint8 [N, 3, S, S]; got {x_all.dtype} {tuple(x_all.shape)}")
    if len(x_all) < 2:
        raise ValueError(f"BatchNorm adaptation needs at least 2 images (a variance), got {len(x_all)}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 for BatchNorm adaptation, got {batch_size}")
    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer to adapt")
    was_training = model.training
    momenta = [layer.momentum for layer in layers]
    model.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
        layer.train()
    device = next(model.parameters()).device
    # A last batch of one image has no variance: fold it into the batch before.
    starts = list(range(0, len(x_all), batch_size))
    if len(x_all) - starts[-1] == 1 and len(starts) > 1:
        starts.pop()
    try:
        for i, start in enumerate(starts):
            stop = starts[i + 1] if i + 1 < len(starts) else len(x_all)
            x = x_all[start:stop].to(device)
            model(normalize_batch(x, loaded.data_config, loaded.channels_last))
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.train(was_training)
    return {"n_images": int(len(x_all)), "n_layers": len(layers)}


# --------------------------------------------------------------------------- beyond AdaBN
# Each method's settings are its paper's, fixed here (docs/adapting.md, "Other methods").

# adabn-balanced: a pseudo-class of fewer cells counts as if it had this many, so one or two
# cells never carry a whole class's weight.
BALANCED_MIN_CELLS = 5
# T3A (Iwasawa & Matsuo, NeurIPS 2021): supports kept per class after the entropy filter (M).
T3A_FILTER_M = 20
# SHOT-IM (Liang, Hu & Feng, ICML 2020): weight of the clustered pseudo-labels' cross-entropy
# (beta), the paper's; epochs, batch, SGD lr/momentum and the trained stages sized for ~1,000
# cells on 2 CPU cores (the paper: 15+ epochs, lr 1e-2, the whole backbone). One epoch: on
# the 2-core box one forward pass over 1,000 cells at 128 px (EfficientNet-Lite0) alone costs
# about 45 s of CPU time, and SHOT needs about six such passes with one epoch.
SHOT_BETA = 0.3
SHOT_EPOCHS = 1
SHOT_BATCH = 64
SHOT_LR = 1e-3
SHOT_MOMENTUM = 0.9
SHOT_STAGES = 2
SHOT_SEED = 0
# The collapse guard: adapted answers whose top class takes more than COLLAPSE_TOP of the
# cells where the unadapted top class took less than COLLAPSE_TOP_BEFORE, or whose classes
# with >= COLLAPSE_CLASS_SHARE of the cells fall to <= COLLAPSE_FEW from > COLLAPSE_FEW.
COLLAPSE_TOP, COLLAPSE_TOP_BEFORE, COLLAPSE_CLASS_SHARE, COLLAPSE_FEW = 0.8, 0.6, 0.05, 2


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of the softmax of each row of ``logits``."""
    log_p = torch.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def balanced_weights(pseudo_labels: Any, n_classes: int, min_cells: int = BALANCED_MIN_CELLS) -> torch.Tensor:
    """Per-cell weights (summing to 1) under which every pseudo-class present counts equally:
    1 / max(cells of its pseudo-class, ``min_cells``), normalised."""
    labels = torch.as_tensor(pseudo_labels, dtype=torch.long)
    counts = torch.bincount(labels, minlength=n_classes).float()
    weights = 1.0 / counts.clamp_min(float(min_cells))[labels]
    return weights / weights.sum()


@torch.no_grad()
def adapt_batchnorm_weighted(loaded: LoadedModel, images_uint8: Any, weights: Any, *,
                             batch_size: int = 64) -> dict[str, int]:
    """``adapt_batchnorm`` with each image weighted (``weights`` [N], >= 0): every BatchNorm
    layer's running mean/variance become the weighted mean/variance of its input over all
    images and pixels, and during the pass each batch is normalised by its own weighted
    statistics (as AdaBN normalises each batch by its statistics). With equal weights this is
    AdaBN up to the variance being pooled over all images rather than averaged over batches."""
    from bloodcell_lib.data.transforms import normalize_batch

    model = loaded.model
    x_all = torch.as_tensor(images_uint8)
    w_all = torch.as_tensor(weights, dtype=torch.float64)
    if len(x_all) < 2 or len(w_all) != len(x_all):
        raise ValueError(f"weighted BatchNorm adaptation needs >= 2 images and one weight each; got "
                         f"{len(x_all)} images, {len(w_all)} weights")
    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer to adapt")
    sums = {id(layer): [0.0, 0.0, 0.0] for layer in layers}  # sum w*x, sum w*x^2, sum w per channel
    current: dict[str, torch.Tensor] = {}

    def pre_hook(layer, inputs):
        x = inputs[0].double()
        w = current["w"].to(x.device).view(-1, *([1] * (x.ndim - 1)))
        dims = [0, *range(2, x.ndim)]
        per_pixel = x[0, 0].numel() if x.ndim > 2 else 1
        sw, swx, swx2 = (w * per_pixel).sum(), (w * x).sum(dims), (w * x * x).sum(dims)
        mean = swx / sw
        layer.running_mean.copy_(mean)  # eval mode: this batch is normalised by its weighted statistics
        layer.running_var.copy_((swx2 / sw - mean * mean).clamp_min(0))
        entry = sums[id(layer)]
        entry[0], entry[1], entry[2] = entry[0] + swx, entry[1] + swx2, entry[2] + sw

    was_training = model.training
    saved = [(layer.running_mean.clone(), layer.running_var.clone()) for layer in layers]
    handles = [layer.register_forward_pre_hook(pre_hook) for layer in layers]
    device = next(model.parameters()).device
    model.eval()
    try:
        for start in range(0, len(x_all), batch_size):
            current["w"] = w_all[start:start + batch_size]
            model(normalize_batch(x_all[start:start + batch_size].to(device), loaded.data_config,
                                  loaded.channels_last))
        for layer in layers:
            swx, swx2, sw = sums[id(layer)]
            mean = swx / sw
            layer.running_mean.copy_(mean)
            layer.running_var.copy_((swx2 / sw - mean * mean).clamp_min(0))
    except BaseException:
        for layer, (mean, var) in zip(layers, saved):
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
        raise
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {"n_images": int(len(x_all)), "n_layers": len(layers)}


def t3a_weights(features: torch.Tensor, logits: torch.Tensor, head: nn.Module,
                filter_m: int = T3A_FILTER_M) -> torch.Tensor:
    """T3A's class prototypes (Iwasawa & Matsuo 2021, their code's ``T3A`` with ``filter_K = M``),
    all cells at once: the supports start as the head's weight rows (each labelled by the head's
    own answer on it), every cell joins the support of its pseudo-label (the head's answer),
    each class keeps its ``filter_m`` supports of lowest prediction entropy, and a class's
    prototype is the mean of its L2-normalised supports. Returns [K, D] prototypes, each
    L2-normalised (a class left without support gets zeros): logits = features @ prototypes.T
    rank classes by cosine similarity to the prototypes."""
    weight = head.weight.detach().flatten(1)
    with torch.no_grad():  # a 1x1 Conv2d head takes its weight rows as [K, D, 1, 1]
        warm_logits = head(weight.view(*weight.shape, *[1] * (head.weight.ndim - 2))).flatten(1).cpu()
    weight, features, logits = weight.float().cpu(), features.cpu(), logits.cpu()
    supports = torch.cat([weight, features.float()])
    all_logits = torch.cat([warm_logits.float(), logits.float()])
    labels, ent = all_logits.argmax(1), entropy(all_logits)
    k = weight.shape[0]
    kept = torch.zeros(len(supports), dtype=torch.bool)
    for c in range(k):
        members = torch.nonzero(labels == c).flatten()
        kept[members[ent[members].argsort(stable=True)[:filter_m]]] = True
    one_hot = torch.nn.functional.one_hot(labels[kept], k).float()
    prototypes = torch.nn.functional.normalize(supports[kept], dim=1).T @ one_hot  # [D, K]
    return torch.nn.functional.normalize(prototypes, dim=0).T.contiguous()


@torch.no_grad()
def set_head(model: nn.Module, weight: torch.Tensor) -> None:
    """The classifier's weight replaced by ``weight`` [K, D] (in place), its bias zeroed."""
    from bloodcell_lib.modeling.models import head_name

    head = model.get_submodule(head_name(model))
    head.weight.copy_(weight.to(head.weight).view_as(head.weight))
    if head.bias is not None:
        head.bias.zero_()


def shot_pseudo_labels(features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """SHOT's clustered pseudo-labels (Liang et al. 2020, ``obtain_label``, cosine distance):
    features with a constant 1 appended, L2-normalised; class centroids weighted by the
    softmax, each cell to its nearest centroid (among the classes the model predicts at all),
    centroids recomputed from those hard labels, nearest centroid again."""
    feats = torch.nn.functional.normalize(
        torch.cat([features.float(), torch.ones(len(features), 1)], dim=1), dim=1)
    affinity = torch.softmax(logits.float(), dim=1)
    present = torch.unique(logits.argmax(1))
    labels = None
    for _ in range(2):
        centroids = affinity.T @ feats / (1e-8 + affinity.sum(0)[:, None])
        similarity = feats @ torch.nn.functional.normalize(centroids[present], dim=1).T
        labels = present[similarity.argmax(1)]
        affinity = torch.nn.functional.one_hot(labels, logits.shape[1]).float()
    return labels


def shot_parameters(model: nn.Module, stages: int = SHOT_STAGES) -> list[torch.nn.Parameter]:
    """What SHOT-IM trains here: the affine weights of every BatchNorm layer and every
    parameter of the last ``stages`` feature stages and after them, the head excepted."""
    from bloodcell_lib.modeling.models import feature_stages, head_name

    head = head_name(model) + "."
    prefix = feature_stages(model)[-stages] + "."
    names = [n for n, _ in model.named_parameters()]
    start = next(i for i, n in enumerate(names) if n.startswith(prefix))
    bn = {id(p) for m in model.modules() if isinstance(m, _BatchNorm) for p in m.parameters(recurse=False)}
    return [p for i, (n, p) in enumerate(model.named_parameters())
            if not n.startswith(head) and (i >= start or id(p) in bn)]


def shot_im(loaded: LoadedModel, images_uint8: Any, features_fn: Any, *,
            pseudo_mask: Any = None, epochs: int = SHOT_EPOCHS, batch_size: int = SHOT_BATCH,
            lr: float = SHOT_LR, beta: float = SHOT_BETA, seed: int = SHOT_SEED) -> list[dict[str, float]]:
    """SHOT-IM with clustered pseudo-labels (in place, head frozen): per epoch, pseudo-labels
    from ``features_fn() -> (logits [N, K], features [N, D])`` (``shot_pseudo_labels``),
    then SGD on the information-maximisation loss (mean entropy minus the entropy of the mean
    prediction) plus ``beta`` x the pseudo-labels' cross-entropy over the cells of
    ``pseudo_mask`` (bool [N]; default all). Only the BatchNorm layers run in train mode.
    Returns per-epoch {epoch, loss, n_pseudo}."""
    from bloodcell_lib.data.transforms import normalize_batch

    model = loaded.model
    x_all = torch.as_tensor(images_uint8)
    mask = torch.ones(len(x_all), dtype=torch.bool) if pseudo_mask is None else torch.as_tensor(pseudo_mask)
    params = shot_parameters(model)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=SHOT_MOMENTUM)
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    history = []
    try:
        for epoch in range(epochs):
            logits, features = features_fn()
            pseudo = shot_pseudo_labels(torch.as_tensor(features), torch.as_tensor(logits))
            model.eval()
            for layer in batchnorm_layers(model):
                layer.train()
            order, total = torch.randperm(len(x_all), generator=generator), 0.0
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                if len(idx) < 2:  # a BatchNorm layer in train mode needs two cells
                    continue
                x = normalize_batch(x_all[idx].to(device), loaded.data_config, loaded.channels_last)
                out = model(x)
                p = torch.softmax(out, dim=1)
                mean_p = p.mean(0)
                loss = entropy(out).mean() + (mean_p * torch.log(mean_p + 1e-5)).sum()
                keep = mask[idx]
                if keep.any():
                    ce = torch.nn.functional.cross_entropy(out[keep.to(device)], pseudo[idx][keep].to(device),
                                                           reduction="sum")
                    loss = loss + beta * ce / len(idx)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(idx)
            history.append({"epoch": epoch + 1, "loss": total / len(x_all), "n_pseudo": int(mask.sum())})
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.eval()
    return history


def collapse_reason(before: Any, after: Any, n_classes: int) -> str | None:
    """Why the adapted answers ``after`` (class indices) collapsed onto one or two classes where
    the unadapted answers ``before`` did not, or None."""
    def shares(pred):
        pred = torch.as_tensor(pred, dtype=torch.long)
        return torch.bincount(pred, minlength=n_classes).float() / max(len(pred), 1)

    b, a = shares(before), shares(after)
    if a.max() > COLLAPSE_TOP and b.max() < COLLAPSE_TOP_BEFORE:
        return (f"the top class took {a.max():.0%} of the cells after adaptation, {b.max():.0%} before "
                f"(guard: > {COLLAPSE_TOP:.0%} from < {COLLAPSE_TOP_BEFORE:.0%})")
    n_b, n_a = int((b >= COLLAPSE_CLASS_SHARE).sum()), int((a >= COLLAPSE_CLASS_SHARE).sum())
    if n_a <= COLLAPSE_FEW < n_b:
        return (f"{n_a} class(es) had >= {COLLAPSE_CLASS_SHARE:.0%} of the cells after adaptation, {n_b} before "
                f"(guard: <= {COLLAPSE_FEW} from >= {COLLAPSE_FEW + 1})")
    return None
