"""One epoch of training and one validation pass, summed over torchrun's ranks.

Each rank sees its share of the global batches; losses, counts and the confusion matrix are
summed over ranks, so N processes report what one process would.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Any, Iterable

import torch
import torch.nn as nn
from tqdm import tqdm

from bloodcell_lib.core import distributed as D
from bloodcell_lib.training.data_loading import Batches, to_model_input


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool):
    # A handful of updates per epoch: readable in a static HTML report, not hundreds of \r lines.
    # delay: epochs shorter than that show no bar at all, only the epoch's summary line.
    return tqdm(iterable, total=total, desc=desc, file=sys.stdout, ascii=True, leave=False,
                disable=not enabled, delay=2.0, mininterval=5.0, maxinterval=1e9, miniters=max(1, total // 4),
                dynamic_ncols=False, ncols=100)


_FAULT = os.environ.get("BLOODCELL_TEST_KILL")  # "rank:epoch:step" -> SIGKILL that rank there


def _test_fault_hook(epoch: int, step: int) -> None:
    """Lets the interruption tests kill a process at an exact point; inert unless the
    variable is set."""
    if _FAULT:
        rank, ep, st = (int(v) for v in _FAULT.split(":"))
        if (D.get_rank(), epoch, step) == (rank, ep, st):
            print(f"[test] rank {rank} killing itself (SIGKILL) at epoch {epoch} step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    loader: Batches, device: torch.device, epoch: int, *, data_config: dict,
                    augment: str = "none", generator: torch.Generator | None = None,
                    channels_last: bool = False, scheduler=None, progress: bool = True,
                    epochs: int | None = None, adapt_frozen_bn: bool = False) -> dict[str, float]:
    """One pass over ``loader``; returns train_loss and train_acc summed over all ranks.
    ``adapt_frozen_bn``: frozen BatchNorm layers normalise with batch statistics and update
    their running statistics (train mode) instead of keeping the pretrained ones (eval mode)."""
    from bloodcell_lib.modeling.models import set_frozen_bn_eval

    model.train()
    if not adapt_frozen_bn:
        set_frozen_bn_eval(model)
    # Sums stay on the device: reading them every step would stall a GPU once per batch.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    desc = f"epoch {epoch}" + (f"/{epochs}" if epochs else "") + " train"
    bar = _progress(loader, len(loader), desc, progress and D.is_main())
    for step, (x_uint8, y) in enumerate(bar):
        _test_fault_hook(epoch, step)
        x = to_model_input(x_uint8, device, data_config, channels_last, augment, generator)
        y = y.to(device, non_blocking=True)
        logits = model(x)
        loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        n = len(y)
        loss_sum += loss.detach().double() * n
        correct += (logits.detach().argmax(1) == y).sum()
        seen += n
        if not bar.disable and (step + 1) % max(1, len(loader) // 8) == 0:  # a few GPU syncs per epoch
            bar.set_postfix(loss=f"{loss_sum.item() / max(seen, 1):.4f}", refresh=False)
    bar.close()
    totals = D.all_reduce(torch.stack([loss_sum.cpu(), correct.cpu(),
                                       torch.tensor(float(seen), dtype=torch.float64)]))
    return {"train_loss": (totals[0] / totals[2].clamp(min=1)).item(),
            "train_acc": (totals[1] / totals[2].clamp(min=1)).item(),
            "train_samples": int(totals[2].item())}


def confusion_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro F1 from a confusion matrix (rows = true class).

    Same definitions as scikit-learn's functions: balanced accuracy averages recall over
    classes present in y_true; macro F1 averages over classes present in y_true or y_pred.
    Working from the confusion matrix lets ranks sum one small tensor instead of gathering
    every prediction.
    """
    cm = confusion.double()
    total = cm.sum()
    tp = cm.diag()
    support = cm.sum(1)
    predicted = cm.sum(0)
    acc = (tp.sum() / total).item() if total > 0 else float("nan")
    has_true = support > 0
    bal = (tp[has_true] / support[has_true]).mean().item() if has_true.any() else float("nan")
    used = has_true | (predicted > 0)
    denom = support + predicted
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1e-12), torch.zeros_like(tp))
    macro_f1 = f1[used].mean().item() if used.any() else float("nan")
    return {"acc": acc, "balanced_acc": bal, "macro_f1": macro_f1}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Batches, device: torch.device, num_classes: int, *,
             data_config: dict, channels_last: bool = False, progress: bool = False,
             desc: str = "val") -> dict[str, Any]:
    """Validation loss and metrics summed over all ranks.

    val_loss is plain cross-entropy (no label smoothing, no class weights) so that it means
    the same in every experiment and can be compared and monitored across them.
    """
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    bar = _progress(loader, len(loader), desc, progress and D.is_main())
    for x_uint8, y in bar:
        x = to_model_input(x_uint8, device, data_config, channels_last)
        logits = model(x).float()
        y_dev = y.to(device)
        loss_sum += nn.functional.cross_entropy(logits, y_dev, reduction="sum").double().cpu()
        pred, y = logits.argmax(1).cpu(), y.cpu()
        confusion += torch.bincount(y * num_classes + pred, minlength=num_classes ** 2).view(
            num_classes, num_classes).double()
    bar.close()
    packed = D.all_reduce(torch.cat([loss_sum.view(1), confusion.flatten()]))
    loss_sum, confusion = packed[0], packed[1:].view(num_classes, num_classes)
    n = confusion.sum().item()
    scores = confusion_metrics(confusion)
    return {"val_loss": loss_sum.item() / max(n, 1), "val_acc": scores["acc"],
            "val_balanced_acc": scores["balanced_acc"], "val_macro_f1": scores["macro_f1"],
            "val_samples": int(n), "confusion": confusion.long()}
