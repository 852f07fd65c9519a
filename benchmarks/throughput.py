"""Throughput benchmark: the project's training and prediction paths against a naive loop.

    .venv/bin/python benchmarks/throughput.py [--dataset pbc] [--model efficientnet_lite0]
        [--image-size 128] [--train-images 800] [--val-images 400] [--epochs 3]
        [--batch-size 32] [--unfreeze-last 5] [--frozen-bn adapt] [--threads 0] [--out benchmarks/results/throughput.json] [--quick]

One run, one seeded stratified subset of a real data set (a train part and a held-out val
part), one model, one resolution, one optimizer / learning rate / number of epochs / seed.
Both paths start from the same weights (``model_init.build_model``) and the same optimizer
(``optim.build_optimizer``):

- naive: a torch ``Dataset`` that opens every JPEG with PIL every epoch and applies
  ``transforms.create_transform(train=True)`` (random flips and 90-degree rotations, the
  same family as the project's ``light`` augmentation), NCHW float32, a default
  ``DataLoader`` (num_workers=0, shuffle), a plain loop;
- project: ``train.fit`` itself, i.e. the uint8 tensor cache decoded once
  (``cache.load_or_build_cache``; the cache is built cold in a temporary folder, so its
  cost is always measured), batches augmented with tensor ops, ``normalize_batch``,
  channels_last, and (``--unfreeze-last N``, default 5, as experiments/pbc.yaml) only the
  head and the last N feature stages trained, the frozen stages' BatchNorm statistics
  re-estimated from the training batches (``--frozen-bn adapt``, as pbc.yaml's
  ``adapt_frozen_bn``). An ablation run of the same path trains every
  layer, as the naive loop does, to show what the partial freeze buys.

Training throughput counts only the training passes (images / seconds of the pass); the
project's cache build is reported on its own and also charged to epoch 1 and to the whole
run. Prediction compares ``predict.predict_images`` (JPEG files) and
``predict.predict_tensors`` (cached uint8 tensors) with a naive loop (one image at a time,
PIL + ``create_transform(train=False)``, NCHW float32).

Prints a Markdown table and writes JSON (atomically) with every setting and the machine.
This is a benchmark, not a test: it asserts nothing about speed.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/throughput.py` without an installed package
    sys.path.insert(0, str(ROOT))

# train first: it sets OMP_WAIT_POLICY=PASSIVE before torch is imported, as for any
# training run of the project; both paths below run in this one process under it.
from bloodcell_lib.training import train as T  # noqa: E402
from bloodcell_lib.training.model_init import build_model  # noqa: E402
from bloodcell_lib.training.optim import build_optimizer, build_scheduler  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from bloodcell_lib.data import cache, datasets, splits, transforms  # noqa: E402
from bloodcell_lib.modeling import models
from bloodcell_lib.modeling.checkpoint import read_checkpoint
from bloodcell_lib.modeling.loaded import load_checkpoint
from bloodcell_lib.evaluation import predict
from bloodcell_lib.core import provenance
from bloodcell_lib.core import distributed as D  # noqa: E402
from bloodcell_lib.training.config import make_config  # noqa: E402
from bloodcell_lib.core.fileio import atomic_write_json  # noqa: E402
from bloodcell_lib.reporting.throughput import THROUGHPUT_FORMAT as FORMAT, trained_layers_text  # noqa: E402

FORMAT_VERSION = 1
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "throughput.json"
TARGET_SPEEDUP = 2.0

# Defaults sized to finish well under 10 minutes on 2 quiet CPU cores; --quick in ~1 minute.
DEFAULTS = {"train_images": 800, "val_images": 400, "epochs": 3, "image_size": 128, "seeds": 3}
QUICK = {"train_images": 192, "val_images": 96, "epochs": 2, "image_size": 96, "seeds": 1}


@dataclasses.dataclass
class Settings:
    dataset: str = "pbc"
    data_dir: str | None = None
    model: str = "efficientnet_lite0"
    pretrained: bool = True
    image_size: int = DEFAULTS["image_size"]
    train_images: int = DEFAULTS["train_images"]
    val_images: int = DEFAULTS["val_images"]
    epochs: int = DEFAULTS["epochs"]
    batch_size: int = 32
    predict_batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    scheduler: str = "cosine"
    augment: str = "light"
    unfreeze_last: int = 5
    adapt_frozen_bn: bool = True
    seed: int = 0
    seeds: int = 3
    threads: int = 0
    quick: bool = False
    out: str = str(DEFAULT_OUT)
    keep_workdir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- data

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _open_rgb(path: str, box: Any) -> Image.Image:
    """What a naive loop does: PIL open + convert (no checks), crop if the row has a box."""
    with Image.open(path) as image:
        if box is not None:
            image = image.crop(tuple(int(v) for v in box))
        return image.convert("RGB")


class NaiveImageDataset(Dataset):
    """(float32 [3, S, S], label): the JPEG is opened and transformed on every access."""

    def __init__(self, rows: list[tuple[str, Any, int]], transform):
        self.rows, self.transform = rows, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        path, box, label = self.rows[i]
        return self.transform(_open_rgb(path, box)), label


def prepare(settings: Settings, work_dir: Path) -> dict[str, Any]:
    """The seeded stratified subset and its train/val split, with the project's own functions
    (``datasets.load_manifest``, ``subset_per_class``, ``splits.make_splits``), saved as the
    split file that ``fit`` is then pinned to, so both paths train and validate on the same rows."""
    t0 = time.perf_counter()
    full = datasets.load_manifest(settings.dataset, settings.data_dir)
    manifest_seconds = time.perf_counter() - t0
    if full.table["box"].notna().any():
        raise SystemExit(f"data set '{settings.dataset}' has crop boxes; this benchmark compares whole-image "
                         "files (predict_images does not crop). Use pbc, kaggle or a folder data set.")
    classes = list(full.classes)
    total = settings.train_images + settings.val_images
    per_class = max(2, math.ceil(total / len(classes)))
    val_fraction = settings.val_images / total
    subset = datasets.subset_per_class(full, per_class, seed=settings.seed)
    table = splits.make_splits(subset.table, val_fraction=val_fraction, test_fraction=0.0, seed=settings.seed)
    # The split file lists every row of the subset, as fit() checks; rows of an official
    # test split (kaggle) are in it but neither path reads them.
    split_file = splits.save_split(table, work_dir / "split.csv")
    # The subset as a CSV data set: fit() then trains on exactly these rows whatever its seed
    # (with subset_per_class, the seed would also pick the rows).
    subset_csv = work_dir / "subset.csv"
    table[["path", "label"]].to_csv(subset_csv, index=False)
    index = {name: i for i, name in enumerate(classes)}

    def rows(part: str) -> list[tuple[str, Any, int]]:
        sub = table[table["split"] == part]
        return [(str(p), b, index[label]) for p, b, label in zip(sub["path"], sub["box"], sub["label"])]

    return {"classes": classes, "per_class": per_class, "val_fraction": val_fraction, "table": table,
            "train": rows("train"), "val": rows("val"), "split_file": split_file, "subset_csv": subset_csv,
            "manifest_seconds": manifest_seconds, "root": str(full.root)}


def make_train_config(settings: Settings, data: dict[str, Any], work_dir: Path, unfreeze_last: int = 0,
                      seed: int | None = None):
    """The TrainConfig both paths follow (fit() runs it; the naive loop copies its settings).
    ``unfreeze_last`` > 0 trains only the head and the last N feature stages. ``seed`` (default
    ``settings.seed``) draws the initial head, the sample order and the augmentation; the
    images and the split stay those of ``prepare``."""
    seed = settings.seed if seed is None else seed
    return make_config(dict(
        name=f"project-last{unfreeze_last}-seed{seed}" if unfreeze_last else f"project-all-seed{seed}",
        freeze="backbone" if unfreeze_last else "none", unfreeze_last=unfreeze_last,
        adapt_frozen_bn=settings.adapt_frozen_bn and unfreeze_last > 0,
        dataset="csv", csv_path=str(data["subset_csv"]), model=settings.model,
        pretrained=settings.pretrained, image_size=settings.image_size, epochs=settings.epochs,
        batch_size=settings.batch_size, optimizer=settings.optimizer, lr=settings.lr, weight_decay=0.0,
        label_smoothing=0.0, scheduler=settings.scheduler, augment=settings.augment, seed=seed,
        threads=settings.threads, val_fraction=data["val_fraction"],
        test_fraction=0.0, split_file=str(data["split_file"]), output_dir=str(work_dir / "runs"),
        channels_last=True, use_cache=False, deterministic=False, monitor="val_acc"))


def warm_pages(paths: list[str]) -> float:
    """Read every file once so neither path pays for a cold disk the other does not."""
    t0 = time.perf_counter()
    for path in paths:
        with open(path, "rb") as handle:
            while handle.read(1 << 20):
                pass
    return time.perf_counter() - t0


def warm_up(cfg, num_classes: int, device: torch.device) -> float:
    """One untimed training step in each memory format (library initialisation, kernel
    selection), so whichever path runs first is not charged for it."""
    t0 = time.perf_counter()
    D.set_threads(cfg.threads)
    model = models.create_model(cfg.model, num_classes, pretrained=False).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
    # The training batch shape: kernels are chosen (and cached) per shape.
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device)
    y = torch.zeros(len(x), dtype=torch.long, device=device)
    for channels_last in (False, True):
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _sync(device)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- naive path

@torch.no_grad()
def naive_evaluate(model: nn.Module, rows, transform, batch_size: int, device: torch.device) -> float:
    model.eval()
    loader = DataLoader(NaiveImageDataset(rows, transform), batch_size=batch_size, shuffle=False)
    correct = seen = 0
    for x, y in loader:
        logits = model(x.to(device))
        correct += int((logits.argmax(1).cpu() == y).sum())
        seen += len(y)
    return correct / max(seen, 1)


def naive_train(cfg, data: dict[str, Any], device: torch.device, data_config: dict) -> tuple[dict, nn.Module]:
    """The baseline: PIL decode + augment every image every epoch, NCHW float32, default DataLoader."""
    T.seed_everything(cfg.seed, cfg.deterministic)
    threads = D.set_threads(cfg.threads)
    model, pretrained_used = build_model(cfg, len(data["classes"]))
    model.to(device)
    optimizer = build_optimizer(cfg, model)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    train_tf = transforms.create_transform(data_config, cfg.image_size, train=True, augment=cfg.augment)
    eval_tf = transforms.create_transform(data_config, cfg.image_size, train=False)
    loader = DataLoader(NaiveImageDataset(data["train"], train_tf), batch_size=cfg.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(cfg.seed))
    scheduler, _ = build_scheduler(cfg, optimizer, len(loader))  # per-epoch schedules only (see parse_args)
    epochs = []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        loss_sum, correct, seen, data_seconds = 0.0, 0, 0, 0.0
        t0 = mark = time.perf_counter()
        for x, y in loader:
            data_seconds += time.perf_counter() - mark  # waiting for decode + augment of this batch
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss = criterion(logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            mark = time.perf_counter()
        _sync(device)
        seconds = time.perf_counter() - t0
        if scheduler is not None:
            scheduler.step()
        epochs.append({"epoch": epoch, "train_pass_seconds": seconds, "train_samples": seen,
                       "data_seconds": data_seconds, "compute_seconds": seconds - data_seconds,
                       "images_per_second": seen / seconds, "train_loss": loss_sum / max(seen, 1),
                       "train_acc": correct / max(seen, 1), "lr": lr})
        print(f"naive   epoch {epoch}/{cfg.epochs}: {seconds:.1f}s ({data_seconds:.1f}s waiting for data)  "
              f"{seen / seconds:.1f} img/s  loss {loss_sum / max(seen, 1):.4f}", flush=True)
    t0 = time.perf_counter()
    val_acc = naive_evaluate(model, data["val"], eval_tf, cfg.batch_size * 2, device)
    return {"epochs": epochs, "val_acc": val_acc, "val_seconds": time.perf_counter() - t0,
            "threads": threads, "pretrained_used": pretrained_used, "memory_format": "contiguous (NCHW)",
            "dtype": "float32", "dataloader": {"num_workers": 0, "batch_size": cfg.batch_size, "shuffle": True}}, model


# --------------------------------------------------------------------------- project path

def project_train(cfg) -> dict[str, Any]:
    """train.fit() as any experiment runs it; timings from its checkpoint and run_info.json."""
    import json

    t0 = time.perf_counter()
    result = T.fit(cfg, progress=False)
    wall = time.perf_counter() - t0
    ckpt = read_checkpoint(result.checkpoint_last)
    info = json.loads((result.run_dir / "run_info.json").read_text())
    epochs = []
    for row in ckpt["history"]:
        seconds, seen = float(row["train_pass_seconds"]), int(row["train_samples"])
        epochs.append({"epoch": int(row["epoch"]), "train_pass_seconds": seconds, "train_samples": seen,
                       "images_per_second": seen / seconds, "train_loss": float(row["train_loss"]),
                       "train_acc": float(row["train_acc"]), "val_acc": float(row["val_acc"]), "lr": float(row["lr"]),
                       "epoch_seconds_with_val_and_checkpoint": float(row["seconds"])})
    return {"epochs": epochs, "val_acc": epochs[-1]["val_acc"],
            "cache_seconds": float(info["timings"]["cache_seconds"]), "fit_wall_seconds": wall,
            "threads": info["distributed"]["threads_per_process"], "device": info["distributed"]["device"],
            "pretrained_used": result.pretrained_used, "memory_format": "channels_last",
            "checkpoint": result.checkpoint_last}


# --------------------------------------------------------------------------- prediction

def _accuracy(predicted: list[str], truth: list[str]) -> float:
    return sum(p == t for p, t in zip(predicted, truth)) / max(len(truth), 1)


def predict_benchmark(checkpoint: Path, naive_model: nn.Module, data: dict[str, Any], data_config: dict,
                      settings: Settings, device: torch.device, work_dir: Path) -> dict[str, Any]:
    classes = data["classes"]
    rows = data["val"]
    paths = [path for path, _, _ in rows]
    truth = [classes[label] for _, _, label in rows]
    out: dict[str, Any] = {"images": len(rows), "batch_size": settings.predict_batch_size}

    # project: predict_images on the JPEG files (decode + resize + batched inference)
    loaded = load_checkpoint(checkpoint, str(device))
    size = loaded.image_size
    warm = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    predict.predict_tensors(loaded, warm, batch_size=settings.predict_batch_size)  # untimed warm-up
    t0 = time.perf_counter()
    result = predict.predict_images(loaded, paths, batch_size=settings.predict_batch_size, device=str(device))
    seconds = time.perf_counter() - t0
    by_path = dict(zip(result.predictions["path"], result.predictions["predicted"]))
    out["predict_images"] = {"seconds": seconds, "images_per_second": len(rows) / seconds,
                             "skipped": len(result.skipped),
                             "val_acc": _accuracy([by_path.get(p, "") for p in paths], truth)}

    # project: predict_tensors on the cached uint8 images (the decode is paid once, reported apart)
    t0 = time.perf_counter()
    val_table = data["table"][data["table"]["split"] == "val"].reset_index(drop=True)
    cached = cache.load_or_build_cache(val_table, size, cache_dir=work_dir / "predict-cache", num_workers=0,
                                       progress=False)
    cache_seconds = time.perf_counter() - t0
    images = cached.images.clone()  # in memory, as in evaluation; not paged from the file while timed
    t0 = time.perf_counter()
    proba = predict.predict_tensors(loaded, images, batch_size=settings.predict_batch_size)
    _sync(device)
    seconds = time.perf_counter() - t0
    out["predict_tensors"] = {"seconds": seconds, "images_per_second": len(rows) / seconds,
                              "cache_build_seconds": cache_seconds,
                              "val_acc": _accuracy([classes[i] for i in proba.argmax(1)], truth)}
    # The naive model judged by the project's evaluator (same cached images, NCHW): separates
    # a difference in training from a difference in how the two paths preprocess val images.
    naive = dataclasses.replace(loaded, model=naive_model, channels_last=False)
    proba = predict.predict_tensors(naive, images, batch_size=settings.predict_batch_size)
    out["naive_model_by_predict_tensors_val_acc"] = _accuracy([classes[i] for i in proba.argmax(1)], truth)

    # naive: one image at a time, PIL + classic eval transform, NCHW float32
    eval_tf = transforms.create_transform(data_config, settings.image_size, train=False)
    naive_model.eval()
    predicted = []
    with torch.no_grad():
        naive_model(eval_tf(_open_rgb(*rows[0][:2])).unsqueeze(0).to(device))  # untimed warm-up
        t0 = time.perf_counter()
        for path, box, _ in rows:
            x = eval_tf(_open_rgb(path, box)).unsqueeze(0).to(device)
            predicted.append(classes[int(torch.softmax(naive_model(x), 1).argmax(1))])
        _sync(device)
        seconds = time.perf_counter() - t0
    out["naive_per_image"] = {"seconds": seconds, "images_per_second": len(rows) / seconds,
                              "val_acc": _accuracy(predicted, truth),
                              "note": "naive model (trained by the naive loop); speed does not depend on the weights"}
    return out


# --------------------------------------------------------------------------- summary

def _rate(epochs: list[dict], first: int = 1, extra_seconds: float = 0.0) -> float | None:
    """Images per second over the epochs from ``first`` on, ``extra_seconds`` (a cache build)
    charged on top of their training passes."""
    chosen = [e for e in epochs if e["epoch"] >= first]
    seconds = sum(e["train_pass_seconds"] for e in chosen) + extra_seconds
    return sum(e["train_samples"] for e in chosen) / seconds if chosen and seconds > 0 else None


def _runs(part: dict) -> list[dict]:
    """One path's runs: ``part["runs"]`` (one per training seed) or ``part`` itself."""
    return part.get("runs") or [part]


def _epochs(part: dict) -> list[dict]:
    """The epoch records of every run of one path."""
    return [e for r in _runs(part) for e in r["epochs"]]


def combine_runs(runs: list[dict]) -> dict:
    """One path over several training seeds: the first run's record, the mean val accuracy
    over all runs (``val_acc``; each run's in ``val_acc_runs``) and every run (``runs``)."""
    accs = [r["val_acc"] for r in runs]
    return {**runs[0], "val_acc": sum(accs) / len(accs), "val_acc_runs": accs, "runs": runs}


def summarise(naive: dict, project: dict, n_val: int, all_layers: dict | None = None) -> dict[str, Any]:
    """Throughputs and speed-ups over every run of each path (steady state = epochs 2..E,
    epoch 1 when E == 1); accuracy = mean val accuracy over the runs.
    ``all_layers``: the project's path training every layer (the partial-freeze ablation)."""
    first_steady = 2 if len(naive["epochs"]) > 1 else 1
    ne, pe = _epochs(naive), _epochs(project)
    cache_s = sum(r["cache_seconds"] for r in _runs(project))
    naive_steady, project_steady = _rate(ne, first_steady), _rate(pe, first_steady)
    naive_epoch1 = _rate([e for e in ne if e["epoch"] == 1])
    project_epoch1 = _rate([e for e in pe if e["epoch"] == 1], extra_seconds=cache_s)
    naive_all = _rate(ne)
    project_all = _rate(pe, extra_seconds=cache_s)
    diff = project["val_acc"] - naive["val_acc"]
    paired = [p["val_acc"] - n["val_acc"] for p, n in zip(_runs(project), _runs(naive))]
    if len(paired) > 1:
        # Seed to seed, the accuracy of one short run varies more than the val set's
        # sampling error: the standard error of the mean paired difference (same seed).
        mean = sum(paired) / len(paired)
        se = math.sqrt(sum((d - mean) ** 2 for d in paired) / (len(paired) - 1) / len(paired))
        se_method = f"paired over {len(paired)} training seeds"
    else:
        # Binomial standard error of the accuracy difference (both on the same n_val images).
        p = (naive["val_acc"] + project["val_acc"]) / 2
        se = math.sqrt(max(2 * p * (1 - p) / max(n_val, 1), 0.0))
        se_method = "binomial, one run per path"
    steady_naive = [e for e in ne if e["epoch"] >= first_steady]
    naive_seconds = sum(e["train_pass_seconds"] for e in steady_naive)
    ablation = {}
    if all_layers is not None:
        all_steady = _rate(_epochs(all_layers), first_steady)
        ablation = {"project_all_layers_steady_images_per_second": all_steady,
                    "speedup_all_layers_steady": all_steady / naive_steady,
                    "val_acc_difference_all_layers": all_layers["val_acc"] - naive["val_acc"]}
    return {
        **ablation,
        "runs_per_path": len(_runs(project)),
        "steady_state_epochs": sorted({e["epoch"] for e in pe if e["epoch"] >= first_steady}),
        # Where the naive loop's time goes: the share spent waiting for the DataLoader (PIL
        # decode + augment) is the most that any input pipeline alone can save.
        "naive_steady_data_fraction": sum(e["data_seconds"] for e in steady_naive) / naive_seconds,
        "naive_steady_compute_images_per_second":
            sum(e["train_samples"] for e in steady_naive) / sum(e["compute_seconds"] for e in steady_naive),
        "naive_steady_images_per_second": naive_steady,
        "project_steady_images_per_second": project_steady,
        "speedup_steady": project_steady / naive_steady,
        "naive_epoch1_images_per_second": naive_epoch1,
        "project_epoch1_with_cache_images_per_second": project_epoch1,
        "speedup_epoch1_with_cache": project_epoch1 / naive_epoch1,
        "naive_all_epochs_images_per_second": naive_all,
        "project_all_epochs_with_cache_images_per_second": project_all,
        "speedup_all_epochs_with_cache": project_all / naive_all,
        "val_acc_difference": diff,
        "val_acc_difference_standard_error": se,
        "val_acc_difference_standard_error_method": se_method,
        "target_speedup": TARGET_SPEEDUP,
        "speedup_target_met": project_steady / naive_steady >= TARGET_SPEEDUP,
        "speedup_target_met_with_cache": project_all / naive_all >= TARGET_SPEEDUP,
        "accuracy_target_met": diff >= 0,
        "accuracy_within_noise": diff >= -2 * se,
    }


def _f(value: float | None, fmt: str = "{:.1f}") -> str:
    return "" if value is None else fmt.format(value)


def _acc(part: dict) -> str:
    """Mean val accuracy, with the range over the training seeds when there are several."""
    runs = part.get("val_acc_runs") or [part["val_acc"]]
    spread = f" ({min(runs):.4f}-{max(runs):.4f})" if len(runs) > 1 else ""
    return f"{part['val_acc']:.4f}{spread}"


def format_table(result: dict[str, Any]) -> str:
    s, n, p, pr = result["summary"], result["naive"], result["project"], result["predict"]
    E = len(p["epochs"])
    steady = s["steady_state_epochs"]
    steady_txt = f"epochs {steady[0]}-{steady[-1]}" if len(steady) > 1 else f"epoch {steady[0]}"
    trained = trained_layers_text(result["settings"])
    lines = [
        "| path | train img/s | speed-up | val accuracy | predict img/s |",
        "|---|---:|---:|---:|---:|",
        f"| naive: PIL decode + augment every epoch, NCHW fp32, DataLoader ({steady_txt}) | "
        f"{_f(s['naive_steady_images_per_second'])} | 1.00x | {_acc(n)} | "
        f"{_f(pr['naive_per_image']['images_per_second'])} (per image) |",
        f"| project: tensor cache, tensor augment, channels_last, {trained} ({steady_txt}) | "
        f"{_f(s['project_steady_images_per_second'])} | {s['speedup_steady']:.2f}x | {_acc(p)} | "
        f"{_f(pr['predict_images']['images_per_second'])} (predict_images, JPEG) |",
    ]
    if result.get("project_all_layers"):
        lines.append(
            f"| ablation: the same project path training all layers ({steady_txt}) | "
            f"{_f(s['project_all_layers_steady_images_per_second'])} | {s['speedup_all_layers_steady']:.2f}x | "
            f"{_acc(result['project_all_layers'])} |  |")
    lines += [
        f"| project epoch 1 incl. cache build ({p['cache_seconds']:.1f} s) vs naive epoch 1 | "
        f"{_f(s['project_epoch1_with_cache_images_per_second'])} | {s['speedup_epoch1_with_cache']:.2f}x |  |  |",
        f"| project all {E} epochs incl. cache build vs naive all {E} epochs | "
        f"{_f(s['project_all_epochs_with_cache_images_per_second'])} | {s['speedup_all_epochs_with_cache']:.2f}x |  |  |",
        f"| project predict_tensors (cached uint8) |  |  |  | "
        f"{_f(pr['predict_tensors']['images_per_second'])} |",
    ]
    d = result["data"]
    st = result["settings"]
    m = result["machine"]
    lines += [
        "",
        f"{st['model']} ({'ImageNet weights' if st['pretrained'] else 'random init'}) at {st['image_size']} px, "
        f"{d['train_images']} train / {d['val_images']} val images of '{st['dataset']}' "
        f"({d['per_class']} per class, seed {st['seed']}), {E} epochs, batch {st['batch_size']}, "
        f"{s.get('runs_per_path', 1)} training seed(s) per path (accuracy: mean, range in brackets), "
        f"{st['optimizer']} lr {st['lr']} ({st['scheduler']}), augment {st['augment']}; device {m['device']}, "
        f"{m['torch_threads']} threads, {m['cpus_usable']} usable CPUs, "
        f"load average {m['loadavg_start'][0]:.2f} at start / {m['loadavg_end'][0]:.2f} at end.",
        f"Naive loop ({steady_txt}): {100 * s['naive_steady_data_fraction']:.0f}% of its time waiting for data "
        f"(PIL decode + augment); its model steps alone run at "
        f"{_f(s['naive_steady_compute_images_per_second'])} img/s (NCHW).",
        f"Target speed-up >= {TARGET_SPEEDUP:.0f}x (steady state): {'met' if s['speedup_target_met'] else 'NOT met'}; "
        f"including the cache build: {'met' if s['speedup_target_met_with_cache'] else 'NOT met'}. "
        f"Accuracy equal or better: {'met' if s['accuracy_target_met'] else 'NOT met'} "
        f"(difference {s['val_acc_difference']:+.4f}, standard error {s['val_acc_difference_standard_error']:.4f}, "
        f"{s.get('val_acc_difference_standard_error_method', 'binomial')}"
        f"{'' if s['accuracy_target_met'] else (', within 2 SE' if s['accuracy_within_noise'] else ', beyond 2 SE')}); "
        f"the naive model scored by the project's evaluator: {pr['naive_model_by_predict_tensors_val_acc']:.4f}.",
    ]
    if result.get("busy_warning"):
        lines.append(f"WARNING: {result['busy_warning']}")
    return "\n".join(lines)


def machine(device: torch.device) -> dict[str, Any]:
    import torchvision

    info = provenance.machine_info()
    info.update({
        "device": str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})",
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OMP_WAIT_POLICY", "OMP_NUM_THREADS",
                                                 "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")},
    })
    return info


def _loadavg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return [float("nan")] * 3


def busy_warning(load_start: float, load_end: float, own_cores: float, cores: int) -> str | None:
    """A warning when other processes competed for the CPUs: the 1-minute load average at the
    start, or at the end minus what this process itself used, above half the usable CPUs.
    A heuristic (the load average lags by about a minute), but it flags a shared, busy box."""
    others_end = load_end - own_cores
    if load_start > 0.5 * cores or others_end > 0.5 * cores:
        return (f"the machine was busy (1-minute load average {load_start:.2f} at start, {load_end:.2f} at end "
                f"of which this benchmark about {own_cores:.2f}; {cores} usable CPUs): other processes competed "
                "for the cores, so these timings are not representative")
    return None


# --------------------------------------------------------------------------- run

def run_benchmark(settings: Settings) -> dict[str, Any]:
    """Run both paths and the prediction comparison; return the result record (also what
    goes into the JSON). Writes nothing outside a temporary folder (or ``keep_workdir``).
    The caller's torch thread count and determinism settings are restored afterwards."""
    threads = torch.get_num_threads()
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        return _run(settings)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def _run(settings: Settings) -> dict[str, Any]:
    started = time.perf_counter()
    load_start = _loadavg()
    times = os.times()
    cpu_start = times.user + times.system
    with tempfile.TemporaryDirectory(prefix="bloodcell-bench-") as tmp:
        work_dir = Path(settings.keep_workdir or tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        data = prepare(settings, work_dir)
        # The naive loop trains every layer, the usual way; the project's path trains only the
        # last stages (the early, high-resolution stages cost most and need least adapting).
        cfg_all = make_train_config(settings, data, work_dir)
        cfg = make_train_config(settings, data, work_dir, settings.unfreeze_last)
        device = D.select_device(0)
        data_config = dict(models.resolve_data_config(cfg.model, cfg.image_size))
        n_train, n_val = len(data["train"]), len(data["val"])
        print(f"benchmark: {cfg.model} at {cfg.image_size}px, {n_train} train / {n_val} val images of "
              f"'{settings.dataset}', {cfg.epochs} epochs, batch {cfg.batch_size}, device {device}", flush=True)
        if len(data["train"]) == 0 or len(data["val"]) == 0:
            raise SystemExit("the subset has no train or no val images; raise --train-images / --val-images")
        page_seconds = warm_pages([path for path, _, _ in data["train"] + data["val"]])
        warm_seconds = warm_up(cfg, len(data["classes"]), device)

        # Several training seeds per path: one short run's accuracy varies from seed to seed by
        # more than the paths differ. Same images, same split; seed = head init, order, augment.
        naive_runs, project_runs, all_runs = [], [], []
        naive_model = checkpoint = None
        for seed in range(settings.seed, settings.seed + settings.seeds):
            run, model = naive_train(dataclasses.replace(cfg_all, seed=seed), data, device, data_config)
            naive_runs.append(run)
            if naive_model is None:
                naive_model = model  # the first seed's models are the ones the prediction rows use
            print(f"seed {seed}: naive   val acc {run['val_acc']:.4f}", flush=True)
            run = project_train(make_train_config(settings, data, work_dir, settings.unfreeze_last, seed))
            if checkpoint is None:
                checkpoint = run["checkpoint"]
            project_runs.append(run)
            print(f"seed {seed}: project cache {run['cache_seconds']:.1f}s; val acc {run['val_acc']:.4f}", flush=True)
            # Ablation: the same path training every layer, to show what the partial freeze buys.
            if settings.unfreeze_last:
                all_runs.append(project_train(make_train_config(settings, data, work_dir, 0, seed)))
                print(f"seed {seed}: project (all layers) val acc {all_runs[-1]['val_acc']:.4f}", flush=True)
        for run in project_runs + all_runs:
            run.pop("checkpoint")
        naive, project = combine_runs(naive_runs), combine_runs(project_runs)
        project_all = combine_runs(all_runs) if all_runs else None
        D.set_threads(cfg.threads)  # fit() restores the caller's thread count; predict with the same
        pred = predict_benchmark(checkpoint, naive_model, data, data_config, settings, device, work_dir)
        mach = machine(device)

    mach["loadavg_start"], mach["loadavg_end"] = load_start, _loadavg()
    result: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "written": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": [os.path.basename(sys.argv[0]), *sys.argv[1:]],
        "settings": settings.to_dict(),
        "train_config": cfg.to_dict(),
        "data": {"dataset": settings.dataset, "root": data["root"], "classes": data["classes"],
                 "per_class": data["per_class"], "train_images": n_train, "val_images": n_val,
                 "manifest_seconds": data["manifest_seconds"], "page_cache_warm_seconds": page_seconds},
        "warm_up_seconds": warm_seconds,
        "machine": mach,
        "naive": naive,
        "project": project,
        "project_all_layers": project_all,
        "predict": pred,
        "summary": summarise(naive, project, n_val, project_all),
        "git": provenance.git_commit(),
    }
    result["wall_seconds"] = time.perf_counter() - started
    used = os.times()
    own = (used.user + used.system - cpu_start) / max(result["wall_seconds"], 1e-9)
    mach["process_cpu_cores_used"] = round(own, 2)
    warning = busy_warning(load_start[0], mach["loadavg_end"][0], own, mach.get("cpus_usable") or 1)
    if warning:
        result["busy_warning"] = warning
    result["table_markdown"] = format_table(result)
    return result


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(
        description="Training and prediction throughput: the project's path vs a naive PIL/DataLoader loop.")
    parser.add_argument("--dataset", default="pbc", help="data set name (default pbc)")
    parser.add_argument("--data-dir", default=None, help="data root or the set's folder (default: searched)")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--no-pretrained", dest="pretrained", action="store_false",
                        help="random initialisation instead of ImageNet weights")
    parser.add_argument("--image-size", type=int, default=None, help=f"default {DEFAULTS['image_size']}")
    parser.add_argument("--train-images", type=int, default=None,
                        help=f"about this many training images (default {DEFAULTS['train_images']})")
    parser.add_argument("--val-images", type=int, default=None,
                        help=f"about this many held-out val images (default {DEFAULTS['val_images']})")
    parser.add_argument("--epochs", type=int, default=None, help=f"default {DEFAULTS['epochs']}")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--predict-batch-size", type=int, default=64)
    parser.add_argument("--optimizer", default="adam", choices=("adam", "adamw"))
    parser.add_argument("--lr", type=float, default=1e-3)
    # Per-epoch schedules only: the naive loop steps them exactly as fit() does. Cosine (as the
    # project's experiments use) makes the last epoch's accuracy much less noisy than a constant lr.
    parser.add_argument("--scheduler", default="cosine", choices=("cosine", "step", "none"))
    parser.add_argument("--augment", default="light", choices=("none", "light"),
                        help="'light' = random flips/90-degree rotations in both paths")
    parser.add_argument("--unfreeze-last", type=int, default=Settings.unfreeze_last,
                        help="the project's path trains the head and the last N feature stages; the naive loop "
                             "and an ablation run of the project's path train all layers (0: all layers, no "
                             f"ablation run; default {Settings.unfreeze_last})")
    parser.add_argument("--frozen-bn", choices=("adapt", "pretrained"), default="adapt",
                        help="BatchNorm statistics of the frozen stages: re-estimated from the training batches "
                             "(adapt, default, as experiments/pbc.yaml) or the pretrained ones")
    parser.add_argument("--seed", type=int, default=0, help="picks the image subset and split (default 0)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="training seeds per path: seed, seed+1, ... (head init, sample order, augmentation); "
                             f"accuracy is their mean (default {DEFAULTS['seeds']})")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: all usable cores)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON result file")
    parser.add_argument("--keep-workdir", default=None,
                        help="keep the run directory, split and caches here (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true",
                        help=f"about a minute: {QUICK['train_images']} train / {QUICK['val_images']} val images, "
                             f"{QUICK['epochs']} epochs, {QUICK['image_size']} px (explicit options still win)")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    values = {key: getattr(args, key) if getattr(args, key) is not None else base[key] for key in base}
    if args.unfreeze_last < 0:
        parser.error("--unfreeze-last must be >= 0")
    for key in ("train_images", "val_images", "epochs", "image_size", "seeds", "batch_size", "predict_batch_size"):
        value = values.get(key, getattr(args, key, None))
        if value is not None and value < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    return Settings(dataset=args.dataset, data_dir=args.data_dir, model=args.model, pretrained=args.pretrained,
                    batch_size=args.batch_size, predict_batch_size=args.predict_batch_size,
                    optimizer=args.optimizer, lr=args.lr, scheduler=args.scheduler, augment=args.augment,
                    unfreeze_last=args.unfreeze_last, adapt_frozen_bn=args.frozen_bn == "adapt",
                    seed=args.seed, threads=args.threads, quick=args.quick, out=args.out,
                    keep_workdir=args.keep_workdir, **values)


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    result = run_benchmark(settings)
    print()
    print(result["table_markdown"], flush=True)
    out = atomic_write_json(settings.out, result)
    print(f"\nwrote {out} ({result['wall_seconds']:.0f} s in all)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
