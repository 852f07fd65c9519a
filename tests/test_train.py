"""train.py on a tiny synthetic folder-per-class data set (coloured shapes, learnable in a few steps)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from bloodcell_lib.core import distributed as D
from bloodcell_lib.modeling import models
from bloodcell_lib.modeling.checkpoint import save_checkpoint
from bloodcell_lib.training import checkpointing, data_loading, loop, model_init, optim, train
from bloodcell_lib.training.config import make_config
from bloodcell_lib.core.fileio import sha256_file

CLASSES = ("circle", "square", "stripes")


def make_tiny_dataset(root: Path, per_class: int = 12, size: int = 36, seed: int = 0,
                      classes=CLASSES, counts: dict[str, int] | None = None) -> Path:
    """Folder-per-class PNGs: each class a shape in its own colour on a random background."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    root = Path(root)
    colours = [(200, 40, 40), (40, 160, 40), (40, 40, 200), (200, 200, 40)]
    for ci, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range((counts or {}).get(name, per_class)):
            img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(150, 230, 3)))
            draw = ImageDraw.Draw(img)
            colour = tuple(int(np.clip(v + rng.integers(-30, 30), 0, 255)) for v in colours[ci % 4])
            o = int(rng.integers(2, 8))
            if ci % 3 == 0:
                draw.ellipse([o, o, size - o, size - o], fill=colour)
            elif ci % 3 == 1:
                draw.rectangle([o, o, size - o, size - o], fill=colour)
            else:
                for x in range(o, size, 8):
                    draw.rectangle([x, 0, x + 3, size], fill=colour)
            img.save(root / name / f"{name}_{i:03d}.png")
    return root


def tiny_config(tmp_path: Path, data_dir: Path, **overrides):
    params = dict(name="tiny", dataset="folder", data_dir=str(data_dir), output_dir=str(tmp_path / "runs"),
                  model="resnet18", pretrained=False, image_size=32, batch_size=8, epochs=2, lr=1e-3,
                  val_fraction=0.25, test_fraction=0.2, augment="light", threads=1, seed=0, deterministic=True)
    params.update(overrides)
    return make_config(params)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(train.provenance, "git_commit", lambda *a, **k: None)  # no git subprocess per run
    monkeypatch.setenv("BLOODCELL_CACHE", str(tmp_path / "cache"))


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- run directory

def test_fit_writes_the_run_directory(tmp_path, tiny_data, monkeypatch, capsys):
    seen_tables = []
    real_cache = data_loading._build_cache

    def spy(cache_module, table, cfg, progress):
        seen_tables.append(table.copy())
        return real_cache(cache_module, table, cfg, progress)

    monkeypatch.setattr(data_loading, "_build_cache", spy)
    cfg = tiny_config(tmp_path, tiny_data, epochs=3)
    result = train.fit(cfg, progress=False)
    run = cfg.run_dir
    assert result.run_dir == run
    for name in ("config.yaml", "split.csv", "history.csv", "checkpoint_last.pt", "checkpoint_best.pt",
                 "run_info.json"):
        assert (run / name).is_file(), name
    assert not list(run.glob(".*.tmp"))

    history = pd.read_csv(run / "history.csv")
    assert list(history.columns) == train.HISTORY_COLUMNS
    assert history["epoch"].tolist() == [1, 2, 3]
    assert history[train.HISTORY_COLUMNS].notna().all().all()
    pd.testing.assert_frame_equal(history, result.history, check_dtype=False)
    assert result.best_epoch in (1, 2, 3)
    assert result.best_metric == history["val_acc"].max()
    assert result.pretrained_used is False and result.class_names == list(CLASSES)
    assert result.train_seconds == pytest.approx(history["seconds"].sum())

    # One line per epoch on stdout.
    out = capsys.readouterr().out
    assert sum(line.startswith("epoch ") for line in out.splitlines()) == 3

    ckpt = torch.load(run / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "epoch", "config", "class_names", "model_name",
                "data_config", "best_metric", "format", "format_version"):
        assert key in ckpt, key
    assert ckpt["format"] == "bloodcell-checkpoint" and ckpt["format_version"] == 1
    assert ckpt["epoch"] == 3 and ckpt["model_name"] == "resnet18" and ckpt["class_names"] == list(CLASSES)
    assert ckpt["config"] == cfg.to_dict()
    assert ckpt["data_config"]["image_size"] == 32 and len(ckpt["data_config"]["mean"]) == 3

    assert yaml.safe_load((run / "config.yaml").read_text()) == cfg.to_dict()
    info = json.loads((run / "run_info.json").read_text())
    assert info["status"] == "finished" and info["seed"] == 0
    assert info["split_sha256"] == sha256_file(run / "split.csv")
    assert info["pretrained"]["used"] is False and info["pretrained"]["init"] == "random"
    for package in ("torch", "torchvision", "timm", "numpy", "sklearn", "PIL", "python"):
        assert info["packages"][package], package
    import socket

    assert socket.gethostname() not in json.dumps(info["machine"])
    assert info["machine"]["cpu_count"] >= 1
    assert info["timings"]["epochs_completed"] == 3 and info["timings"]["train_images_per_second"] > 0
    assert info["failed_images"] == [] and info["dropped_images"] == []

    # Training decoded train and val images only, never the test split.
    split = pd.read_csv(run / "split.csv")
    assert (split["split"] == "test").any()
    decoded = set(pd.concat(seen_tables)["path"])
    assert decoded == set(split.loc[split["split"] != "test", "path"])


def test_bad_images_are_reported_not_silently_skipped(tmp_path, tiny_data):
    data = tmp_path / "data"
    make_tiny_dataset(data, per_class=8)
    (data / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    result = train.fit(tiny_config(tmp_path, data, epochs=1), progress=False)
    info = json.loads((result.run_dir / "run_info.json").read_text())
    listed = info["dropped_images"] + info["failed_images"]
    assert any("broken.png" in entry["item"] for entry in listed), listed
    assert all(entry["reason"] for entry in listed)


def test_checkpoint_best_holds_the_best_epochs_own_weights(tmp_path, tiny_data, monkeypatch):
    """Scripted val accuracy peaks at epoch 2 of 4: best must be epoch 2's weights, not the last."""
    script = {1: 0.5, 2: 0.9, 3: 0.6, 4: 0.7}
    weights_at_eval = {}
    real_evaluate = train.evaluate

    def scripted(model, loader, device, num_classes, **kwargs):
        out = real_evaluate(model, loader, device, num_classes, **kwargs)
        epoch = len(weights_at_eval) + 1
        weights_at_eval[epoch] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}  # checkpoints hold CPU tensors
        out["val_acc"] = script[epoch]
        return out

    monkeypatch.setattr(train, "evaluate", scripted)
    cfg = tiny_config(tmp_path, tiny_data, epochs=4, deterministic=False)
    result = train.fit(cfg, progress=False)
    assert result.best_epoch == 2 and result.best_metric == 0.9
    best = torch.load(result.checkpoint_best, map_location="cpu", weights_only=True)
    last = torch.load(result.checkpoint_last, map_location="cpu", weights_only=True)
    assert best["epoch"] == 2 and best["best_epoch"] == 2 and last["epoch"] == 4
    assert _same_weights(best["model"], weights_at_eval[2])
    assert _same_weights(last["model"], weights_at_eval[4])
    assert not _same_weights(best["model"], last["model"])


def test_early_stopping_stops_after_patience(tmp_path, tiny_data, monkeypatch):
    real_evaluate = train.evaluate

    def flat(*args, **kwargs):
        out = real_evaluate(*args, **kwargs)
        out["val_loss"] = 1.0  # never improves after the first epoch
        return out

    monkeypatch.setattr(train, "evaluate", flat)
    cfg = tiny_config(tmp_path, tiny_data, epochs=10, early_stopping_patience=2, monitor="val_loss",
                      deterministic=False)
    result = train.fit(cfg, progress=False)
    assert result.stopped_early and result.epochs_run == 3 and result.best_epoch == 1
    assert len(pd.read_csv(result.run_dir / "history.csv")) == 3
    info = json.loads((result.run_dir / "run_info.json").read_text())
    assert info["status"] == "early_stopped"


def test_monitor_none_keeps_the_last_epoch(tmp_path, tiny_data, monkeypatch):
    real_evaluate = train.evaluate
    accuracies = iter([0.9, 0.5, 0.4])  # val_acc would keep epoch 1

    def falling(*args, **kwargs):
        out = real_evaluate(*args, **kwargs)
        out["val_acc"] = next(accuracies)
        return out

    monkeypatch.setattr(train, "evaluate", falling)
    cfg = tiny_config(tmp_path, tiny_data, epochs=3, monitor="none", deterministic=False)
    result = train.fit(cfg, progress=False)
    assert result.best_epoch == 3 and result.epochs_run == 3 and not result.stopped_early
    best = torch.load(result.checkpoint_best, weights_only=False)
    last = torch.load(result.checkpoint_last, weights_only=False)
    assert best["epoch"] == last["epoch"] == 3
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])


# --------------------------------------------------------------------------- sampling, loss

def test_balanced_sampler_draws_classes_about_equally():
    labels = torch.tensor([0] * 180 + [1] * 18 + [2] * 2)
    drawn = torch.cat([D.global_epoch_indices(labels, epoch, seed=3, balanced=True) for epoch in range(20)])
    assert len(drawn) == 20 * len(labels)  # epoch length = train size
    share = torch.bincount(labels[drawn], minlength=3).double() / len(drawn)
    assert torch.allclose(share, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.03), share
    # With replacement: the 2 minority images recur many times per epoch.
    one_epoch = D.global_epoch_indices(labels, 0, seed=3, balanced=True)
    assert (labels[one_epoch] == 2).sum() > 30
    # Shuffled (not balanced) is a permutation; both depend only on (seed, epoch).
    perm = D.global_epoch_indices(labels, 5, seed=3)
    assert sorted(perm.tolist()) == list(range(len(labels)))
    assert torch.equal(perm, D.global_epoch_indices(labels, 5, seed=3))
    assert not torch.equal(perm, D.global_epoch_indices(labels, 6, seed=3))


def test_rank_shares_cover_the_global_order_like_one_process():
    labels = torch.arange(23) % 3
    for balanced in (False, True):
        order = D.global_epoch_indices(labels, 1, seed=0, balanced=balanced)
        shares = [D.epoch_indices(labels, 1, 0, rank=r, world_size=2, balanced=balanced) for r in range(2)]
        assert len(shares[0]) == len(shares[1]) == 12  # padded: equal steps on every rank
        merged = torch.stack(shares, 1).flatten()
        assert torch.equal(merged[:23], order) and merged[23] == order[0]
        # Global batch b of one process (size 8) == union of the ranks' batch b (size 4 each).
        single = D.batches(order, 8)
        per_rank = [D.batches(s, 4) for s in shares]
        for b in range(2):
            assert sorted(single[b].tolist()) == sorted(per_rank[0][b].tolist() + per_rank[1][b].tolist())


def test_batches_never_end_with_a_single_sample():
    sizes = [len(b) for b in D.batches(torch.arange(17), 8)]
    assert sizes == [8, 9]


def test_class_weights_are_inverse_frequency():
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 1 + [4] * 2)  # class 3 absent
    w = optim.class_weights_for(labels, 5)
    counts = torch.tensor([6, 3, 1, 0, 2.0])
    expected = torch.where(counts > 0, 12 / (4 * counts.clamp(min=1)), torch.zeros(5))
    assert torch.allclose(w, expected)
    assert w[2] > w[1] > w[0] and w[3] == 0


def test_fit_builds_the_configured_loss(tmp_path, tiny_data, monkeypatch):
    captured = {}
    real = train.train_one_epoch

    def spy(model, criterion, *args, **kwargs):
        captured["criterion"] = criterion
        return real(model, criterion, *args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", spy)
    cfg = tiny_config(tmp_path, tiny_data, epochs=1, class_weights=True, label_smoothing=0.1,
                      deterministic=False)
    train.fit(cfg, progress=False)
    criterion = captured["criterion"]
    assert criterion.label_smoothing == pytest.approx(0.1)
    split = pd.read_csv(cfg.run_dir / "split.csv")
    counts = split[split["split"] == "train"]["label"].value_counts().reindex(list(CLASSES)).to_numpy()
    expected = counts.sum() / (len(CLASSES) * counts)
    assert np.allclose(criterion.weight.cpu().numpy(), expected, rtol=1e-5)

    # Smoothing moves the target away from one-hot: a confident correct prediction costs more.
    logits, target = torch.tensor([[8.0, 0.0, 0.0]]), torch.tensor([0])
    plain = torch.nn.CrossEntropyLoss()(logits, target)
    smooth = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(logits, target)
    assert smooth > plain


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_confusion_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    y[y == 3] = 2  # class 3 absent from y_true
    p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 5, 200))
    cm = torch.tensor(confusion_matrix(y, p, labels=range(5)))
    got = loop.confusion_metrics(cm)
    assert got["acc"] == pytest.approx(accuracy_score(y, p))
    assert got["balanced_acc"] == pytest.approx(balanced_accuracy_score(y, p))
    assert got["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"))


@pytest.mark.parametrize("name", ["none", "cosine", "onecycle", "step"])
def test_schedulers(name):
    cfg = make_config({"scheduler": name, "epochs": 6, "lr": 0.1, "model": "resnet18"})
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler, per_batch = optim.build_scheduler(cfg, opt, steps_per_epoch=5)
    assert per_batch == (name == "onecycle")
    lrs = []
    for _ in range(cfg.epochs):
        for _ in range(5):
            opt.step()
            if per_batch:
                scheduler.step()
        lrs.append(opt.param_groups[0]["lr"])
        if scheduler is not None and not per_batch:
            scheduler.step()
    if name == "none":
        assert lrs == [0.1] * 6
    else:
        assert lrs[-1] < 0.1 * 0.5


# --------------------------------------------------------------------------- model handling

def test_frozen_backbone_keeps_batchnorm_statistics(tmp_path, tiny_data):
    cfg = tiny_config(tmp_path, tiny_data, epochs=1, freeze="backbone", deterministic=False)
    result = train.fit(cfg, progress=False)
    state = _state(result.checkpoint_last)
    fresh = models.create_model("resnet18", 3, pretrained=False)
    for key in ("bn1.running_mean", "bn1.running_var", "layer4.1.bn2.running_mean"):
        assert torch.equal(state[key], fresh.state_dict()[key]), key
    assert torch.equal(state["layer1.0.conv1.weight"], _initial_weights(cfg)["layer1.0.conv1.weight"])
    assert not torch.equal(state["fc.weight"], _initial_weights(cfg)["fc.weight"])


def test_adapt_frozen_bn_updates_statistics_but_not_weights(tmp_path, tiny_data):
    cfg = tiny_config(tmp_path, tiny_data, epochs=1, freeze="backbone", adapt_frozen_bn=True, deterministic=False)
    result = train.fit(cfg, progress=False)
    state, initial = _state(result.checkpoint_last), _initial_weights(cfg)
    for key in ("bn1.running_mean", "bn1.running_var", "layer4.1.bn2.running_mean"):
        assert not torch.equal(state[key], initial[key]), key  # re-estimated from the training images
    for key in ("bn1.weight", "bn1.bias", "layer1.0.conv1.weight"):
        assert torch.equal(state[key], initial[key]), key  # the frozen parameters themselves stay


def _initial_weights(cfg):
    model, _ = train.build_model(cfg, 3)
    return model.state_dict()


def test_pretrained_fallback_is_recorded(tmp_path, tiny_data, monkeypatch, capsys):
    real = models.create_model

    def no_weights(name, num_classes, *, pretrained=True, **kwargs):
        if pretrained:
            raise models.PretrainedWeightsUnavailable(f"ImageNet weights for {name!r} are not available offline")
        return real(name, num_classes, pretrained=False, **kwargs)

    monkeypatch.setattr(models, "create_model", no_weights)
    cfg = tiny_config(tmp_path, tiny_data, epochs=1, pretrained=True, allow_random_init=False)
    with pytest.raises(models.PretrainedWeightsUnavailable, match="not available"):
        train.fit(cfg, progress=False)

    cfg = tiny_config(tmp_path, tiny_data, epochs=1, pretrained=True, allow_random_init=True)
    result = train.fit(cfg, progress=False)
    assert result.pretrained_used is False
    assert "WARNING" in capsys.readouterr().out
    info = json.loads((result.run_dir / "run_info.json").read_text())
    assert info["pretrained"] == {**info["pretrained"], "requested": True, "used": False, "init": "random"}
    assert torch.load(result.checkpoint_last, weights_only=True)["pretrained_used"] is False


# --------------------------------------------------------------------------- reproducibility, resume

def test_deterministic_runs_repeat_exactly(tmp_path, tiny_data):
    a = train.fit(tiny_config(tmp_path, tiny_data, name="a"), progress=False)
    b = train.fit(tiny_config(tmp_path, tiny_data, name="b"), progress=False)
    metrics = [c for c in train.HISTORY_COLUMNS if c != "seconds"]
    pd.testing.assert_frame_equal(a.history[metrics], b.history[metrics])
    assert _same_weights(_state(a.checkpoint_last), _state(b.checkpoint_last))


def test_resume_continues_to_the_same_result(tmp_path, tiny_data, monkeypatch, capsys):
    """Ctrl-C in epoch 3 of 3, then resume: same history and weights as the uninterrupted run
    (onecycle: the per-batch schedule state must be restored too)."""
    full = train.fit(tiny_config(tmp_path, tiny_data, name="full", epochs=3, scheduler="onecycle"),
                     progress=False)
    real = train.train_one_epoch

    def interrupted(model, criterion, optimizer, loader, device, epoch, **kwargs):
        if epoch == 3:
            raise KeyboardInterrupt
        return real(model, criterion, optimizer, loader, device, epoch, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", interrupted)
    cfg = tiny_config(tmp_path, tiny_data, name="part", epochs=3, scheduler="onecycle")
    with pytest.raises(KeyboardInterrupt):
        train.fit(cfg, progress=False)
    assert torch.load(cfg.run_dir / "checkpoint_last.pt", weights_only=True)["epoch"] == 2
    assert len(pd.read_csv(cfg.run_dir / "history.csv")) == 2
    monkeypatch.setattr(train, "train_one_epoch", real)

    resumed = train.fit(tiny_config(tmp_path, tiny_data, name="part", epochs=3, scheduler="onecycle",
                                    resume=True), progress=False)
    out = capsys.readouterr().out
    assert "continuing" in out and "after epoch 2" in out
    metrics = [c for c in train.HISTORY_COLUMNS if c != "seconds"]
    pd.testing.assert_frame_equal(resumed.history[metrics], full.history[metrics])
    assert _same_weights(_state(resumed.checkpoint_last), _state(full.checkpoint_last))
    assert resumed.best_epoch == full.best_epoch
    assert _same_weights(_state(resumed.checkpoint_best), _state(full.checkpoint_best))


def test_resume_without_checkpoint_starts_fresh(tmp_path, tiny_data, capsys):
    result = train.fit(tiny_config(tmp_path, tiny_data, epochs=1, resume=True), progress=False)
    assert "no checkpoint" in capsys.readouterr().out and result.epochs_run == 1


def test_resume_refuses_a_different_config(tmp_path, tiny_data):
    train.fit(tiny_config(tmp_path, tiny_data, epochs=1), progress=False)
    with pytest.raises(checkpointing.ResumeError, match="'image_size'.*32.*48"):
        train.fit(tiny_config(tmp_path, tiny_data, epochs=2, image_size=48, resume=True), progress=False)
    with pytest.raises(checkpointing.ResumeError, match="'model'"):
        train.fit(tiny_config(tmp_path, tiny_data, epochs=2, model="resnet34", resume=True), progress=False)
    # More epochs with a constant learning rate is a legitimate continuation.
    result = train.fit(tiny_config(tmp_path, tiny_data, epochs=2, resume=True), progress=False)
    assert result.history["epoch"].tolist() == [1, 2]


def test_cross_validation_writes_one_run_per_fold(tmp_path, tiny_data):
    cfg = tiny_config(tmp_path, tiny_data, epochs=1, cv_folds=2, test_fraction=0.0, deterministic=False)
    results = train.fit_experiment(cfg)
    assert [r.fold for r in results] == [0, 1]
    for i, r in enumerate(results):
        assert r.run_dir == cfg.run_dir / f"fold_{i}"
        assert (r.run_dir / "checkpoint_best.pt").is_file()
    tests = [set(pd.read_csv(r.run_dir / "split.csv").query("split == 'test'")["path"]) for r in results]
    assert not tests[0] & tests[1]
    summary = pd.read_csv(cfg.run_dir / "cv_summary.csv")
    assert summary["fold"].tolist() == [0, 1]


def test_init_from_loads_all_but_the_head(tmp_path, tiny_data, capsys):
    source = train.fit(tiny_config(tmp_path, tiny_data, name="source", epochs=1), progress=False)
    cfg = tiny_config(tmp_path, tiny_data, name="target", init_from="source", epochs=1, seed=1)
    model, _ = train.build_model(cfg, 3)
    loaded, trained = model.state_dict(), _state(source.checkpoint_best)
    assert all(torch.equal(loaded[k], trained[k]) for k in trained if not k.startswith("fc."))
    assert not torch.equal(loaded["fc.weight"], trained["fc.weight"])  # a fresh head for the new task
    result = train.fit(cfg, progress=False)
    info = json.loads((result.run_dir / "run_info.json").read_text())
    assert info["pretrained"]["init"] == "checkpoint"
    assert info["pretrained"]["init_checkpoint"] == {"path": str(source.checkpoint_best),
                                                     "sha256": sha256_file(source.checkpoint_best)}
    assert f"weights of {source.checkpoint_best}" in capsys.readouterr().out


def test_init_from_errors_name_the_problem(tmp_path, tiny_data):
    with pytest.raises(train.ConfigError, match="train experiment 'missing' first"):
        train.build_model(tiny_config(tmp_path, tiny_data, init_from="missing"), 3)
    other = train.fit(tiny_config(tmp_path, tiny_data, name="other", model="resnet34", epochs=1), progress=False)
    with pytest.raises(train.ConfigError, match="holds a 'resnet34' model, this experiment builds 'resnet18'"):
        train.build_model(tiny_config(tmp_path, tiny_data, init_from=str(other.checkpoint_best)), 3)


def test_init_from_refuses_weights_trained_on_overlapping_images(tmp_path):
    """Kaggle dataset2 is made from BCCD originals: weights from one have seen the other's test cells."""
    model = models.create_model("resnet18", 3, pretrained=False)
    path = tmp_path / "kaggle.pt"
    weights = {"model": model.state_dict(), "epoch": 1, "class_names": ["a", "b", "c"], "model_name": "resnet18",
               "data_config": {}}
    save_checkpoint({**weights, "config": {"model": "resnet18", "dataset": "kaggle"}}, path)
    cfg = make_config(dict(name="b", dataset="bccd", model="resnet18", init_from=str(path)))
    with pytest.raises(train.ConfigError, match="shares images with 'bccd'.*leakage"):
        model_init.init_from_checkpoint(model, cfg)
    assert model_init.init_from_checkpoint(model, make_config(dict(name="p", dataset="pbc", model="resnet18",
                                                              init_from=str(path)))) is False
    # extra training images count too: a Kaggle model that also trained on PBC cells
    save_checkpoint({**weights, "config": {"model": "resnet18", "dataset": "kaggle", "extra_train": "pbc"}}, path)
    with pytest.raises(train.ConfigError, match="was trained on 'pbc'"):
        model_init.init_from_checkpoint(model, make_config(dict(name="p", dataset="pbc", model="resnet18",
                                                           init_from=str(path))))


def test_init_from_refuses_weights_trained_on_the_held_out_lab(tmp_path):
    """A leave-one-lab-out run may start from a model of a training lab, never of its test lab."""
    model = models.create_model("resnet18", 5, pretrained=False)
    path = tmp_path / "pbc.pt"
    save_checkpoint({"model": model.state_dict(), "epoch": 1, "class_names": list("abcde"), "model_name": "resnet18",
                     "data_config": {}, "config": {"model": "resnet18", "dataset": "pbc"}}, path)
    multi = dict(dataset="multi", sources=["pbc", "bccd", "lisc"], crop="nucleus", model="resnet18",
                 init_from=str(path))
    for test_source in ("pbc", None):  # held out, or split into the general model's test part
        with pytest.raises(train.ConfigError, match="trained on 'pbc'.*leakage"):
            model_init.init_from_checkpoint(model, make_config(dict(name="m", test_source=test_source, **multi)))
    assert model_init.init_from_checkpoint(model, make_config(dict(name="m", test_source="lisc", **multi))) is False
