"""One experiment's settings: defaults here, overridden by a YAML file, saved with the run.

The same YAML drives the notebooks (papermill ``-f``) and ``bloodcell train
--config``, so every key is a plain literal. Validation happens before any work starts and
names the parameter and the values it accepts.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bloodcell_lib.data.catalog import CROPS, DATASETS, MULTI_CROPS, MULTI_SOURCES, SAME_IMAGES
from bloodcell_lib.data.sources import lab_of
from bloodcell_lib.modeling.rundir import RunDir

OPTIMIZERS = ("adam", "adamw")
SCHEDULERS = ("none", "cosine", "onecycle", "step")
# The validation metric that picks the kept checkpoint (checkpoint_best.pt); "none" keeps the last
# epoch's: on a small validation set the best of many noisy epochs is chosen partly for its noise.
MONITORS = ("val_acc", "val_loss", "val_balanced_acc", "val_macro_f1", "none")
PROFILES = ("full", "smoke")
# Which run_all.sh builds run an experiment: main -- every build; ablation -- only
# --profile complete (and smoke), so the default full build stays within its time target.
BUILDS = ("main", "ablation")
PLAIN_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"  # an experiment name: a folder name, no '/' or '..'


class ConfigError(ValueError):
    """A parameter has a value the project cannot use; raised before any work starts."""


def setting(default: Any, *, resume_may_change: bool = False, factor: bool = True, smoke: Any = None) -> Any:
    """A TrainConfig field with what the project knows about it, read by the helpers below:

    ``resume_may_change``: may differ between a checkpoint and the run resuming it (it does
    not change what the finished model is); ``factor=False``: names, places or schedules a run
    without changing what it learns, never an ablation factor; ``smoke``: the smoke profile's
    cap (``smoke_overrides``)."""
    metadata = {"resume_may_change": resume_may_change, "factor": factor, "smoke": smoke}
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    # identity
    name: str = setting("experiment", resume_may_change=True, factor=False)
    title: str = setting("", resume_may_change=True, factor=False)
    ablation_of: str | None = setting(None, resume_may_change=True, factor=False)  # report only: the main experiment this one varies (its name)
    build: str = setting("main", resume_may_change=True, factor=False)  # report only: main or ablation (BUILDS)
    # data
    dataset: str = "pbc"
    data_dir: str | None = None
    csv_path: str | None = None
    crop: str = "none"
    crop_margin: float = 0.15
    crop_window: int = 200  # crop: window -- the square's side in the picture's own pixels
    drop_classes: list[str] = field(default_factory=list)
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    cv_folds: int = setting(0, smoke=2)
    split_file: str | None = None
    subset_per_class: int = setting(0, smoke=12)
    # Training-only images from another named data set (found like data_dir: null), for the
    # classes both sets share (names matched ignoring case): added to the training split of
    # every run and fold, never to validation or test, so every score stays on this data set.
    # At most extra_train_per_class images per class (0: all), drawn with seed. Cropped by
    # stain when crop is 'stain', else whole pictures.
    extra_train: str | None = None
    extra_train_per_class: int = 0
    # dataset: multi -- several labs' sets on their shared classes (data/multisource.py).
    # test_source: the lab held out (all its pictures are test, none train or validate);
    # null: every source split into train/val/test on its own. source_per_class caps each
    # training source's pictures per class (0: all), drawn with seed; the held-out lab is
    # capped by test_source_per_class only (0: every picture it has).
    sources: list[str] = field(default_factory=list)
    test_source: str | None = None
    source_per_class: int = 0
    test_source_per_class: int = 0
    # model
    model: str = "resnet34"
    pretrained: bool = True
    allow_random_init: bool = setting(False, resume_may_change=True)
    # Start from another run's weights (all but the classifier head): the name of an experiment
    # in the same runs folder (its checkpoint_best.pt) or the path of a bloodcell checkpoint.
    init_from: str | None = None
    freeze: str = "none"
    unfreeze_last: int = 0
    # Frozen layers' BatchNorm: false keeps the pretrained running statistics; true re-estimates
    # them from the training batches while the weights stay frozen (AdaBN: the statistics
    # follow the new image domain at no extra cost).
    adapt_frozen_bn: bool = False
    image_size: int = setting(224, smoke=64)
    channels_last: bool = True
    # optimisation
    epochs: int = setting(15, resume_may_change=True, smoke=1)
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    class_weights: bool = False
    balanced_sampling: bool = False
    # multi: every training source drawn equally often, classes balanced within each source
    # (so the largest lab does not decide what "normal" looks like).
    per_source_balanced: bool = False
    scheduler: str = "none"
    early_stopping_patience: int = setting(0, resume_may_change=True, smoke=1)
    monitor: str = "val_acc"
    augment: str = "light"
    # Colour normalisation at load time (data/color_norm.py): none, or reinhard (each picture's
    # L*a*b* statistics moved to the training pictures' average; stored in the checkpoint).
    color_norm: str = "none"
    use_cache: bool = setting(True, resume_may_change=True)
    tta: bool = setting(False, resume_may_change=True)
    # reproducibility and execution
    seed: int = 0
    deterministic: bool = setting(False, resume_may_change=True)
    num_workers: int = setting(0, resume_may_change=True, factor=False)
    threads: int = setting(0, resume_may_change=True, factor=False)
    # Where training and evaluation run: auto (CUDA when torch sees a GPU, else the CPU), cpu or cuda.
    device: str = setting("auto", resume_may_change=True, factor=False)
    output_dir: str | None = setting(None, resume_may_change=True, factor=False)
    resume: bool = setting(False, resume_may_change=True, factor=False)
    profile: str = setting("full", resume_may_change=True, factor=False)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def run_dir(self) -> Path:
        from bloodcell_lib.core.paths import PROJECT_ROOT, runs_dir

        if self.output_dir is None:
            return runs_dir() / self.name
        out = Path(self.output_dir).expanduser()
        return (out if out.is_absolute() else PROJECT_ROOT / out) / self.name

    @property
    def init_checkpoint(self) -> Path | None:
        """The checkpoint ``init_from`` names: another experiment's best checkpoint beside this
        run's folder, or a file path."""
        if not self.init_from:
            return None
        if self.init_from.endswith(".pt"):
            return Path(self.init_from).expanduser()
        return RunDir(self.run_dir.parent / self.init_from).checkpoint_best


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainConfig))


def _marked(key: str) -> dict[str, Any]:
    return {f.name: f.metadata[key] for f in dataclasses.fields(TrainConfig) if key in f.metadata}


def resume_may_change() -> frozenset[str]:
    """Parameters that may differ between a checkpoint and the run that resumes it (epochs is
    checked separately against the learning-rate schedule: checkpointing.check_resumable)."""
    return frozenset(name for name, may in _marked("resume_may_change").items() if may)


def not_factors() -> frozenset[str]:
    """Settings that name, place or schedule a run without changing what it learns."""
    return frozenset(name for name, factor in _marked("factor").items() if not factor)


def smoke_overrides() -> dict[str, Any]:
    """The smoke profile's caps: it proves the whole pipeline runs, in seconds per experiment."""
    return {name: cap for name, cap in _marked("smoke").items() if cap is not None}


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"parameter '{name}' = {value!r} is not accepted; use one of: {', '.join(allowed)}")


def _at_least(name: str, value: Any, minimum: float, kind: type = int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ConfigError(f"parameter '{name}' = {value!r} must be a{'n integer' if kind is int else ' number'}")
    if value < minimum:
        raise ConfigError(f"parameter '{name}' = {value!r} must be >= {minimum}")


def _fraction(name: str, value: Any) -> None:
    _at_least(name, value, 0.0, float)
    if value >= 1:
        raise ConfigError(f"parameter '{name}' = {value!r} must be a fraction in [0, 1)")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Raise ConfigError for the first bad parameter; return cfg unchanged otherwise."""
    # late: these import torch; each list of accepted values has one home, the code that uses it
    from bloodcell_lib.core.distributed import DEVICE_NAMES
    from bloodcell_lib.data.color_norm import METHODS as COLOR_NORMS
    from bloodcell_lib.data.transforms import AUGMENT_LEVELS
    from bloodcell_lib.modeling.models import FREEZE_MODES, available_models

    if not isinstance(cfg.name, str) or not re.fullmatch(PLAIN_NAME, cfg.name):
        raise ConfigError(f"parameter 'name' = {cfg.name!r} must be a plain folder name "
                          "(letters, digits, '.', '_', '-'; no '/' or '..')")
    if cfg.ablation_of is not None and (not isinstance(cfg.ablation_of, str)
                                        or not re.fullmatch(PLAIN_NAME, cfg.ablation_of)
                                        or cfg.ablation_of == cfg.name):
        raise ConfigError(f"parameter 'ablation_of' = {cfg.ablation_of!r} must be null or the name of another "
                          "experiment (letters, digits, '.', '_', '-')")
    if cfg.init_from is not None and (not isinstance(cfg.init_from, str) or cfg.init_from == cfg.name
                                      or not (re.fullmatch(PLAIN_NAME, cfg.init_from)
                                              or cfg.init_from.endswith(".pt"))):
        raise ConfigError(f"parameter 'init_from' = {cfg.init_from!r} must be null, the name of another "
                          "experiment, or the path of a checkpoint file (.pt)")
    for name in BOOL_FIELDS:
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(f"parameter '{name}' = {getattr(cfg, name)!r} must be true or false")
    _choice("dataset", cfg.dataset, DATASETS)
    _choice("crop", cfg.crop, CROPS)
    _choice("optimizer", cfg.optimizer, OPTIMIZERS)
    _choice("scheduler", cfg.scheduler, SCHEDULERS)
    _choice("freeze", cfg.freeze, FREEZE_MODES)
    _choice("monitor", cfg.monitor, MONITORS)
    if cfg.monitor == "none" and cfg.early_stopping_patience:
        raise ConfigError(f"parameter 'early_stopping_patience' = {cfg.early_stopping_patience} needs a metric "
                          "to watch, but monitor is 'none' (keep the last epoch); set one of them differently")
    _choice("augment", cfg.augment, AUGMENT_LEVELS)
    _choice("color_norm", cfg.color_norm, COLOR_NORMS)
    _choice("profile", cfg.profile, PROFILES)
    _choice("build", cfg.build, BUILDS)
    _choice("device", cfg.device, DEVICE_NAMES)
    models = available_models()
    if cfg.model not in models:
        raise ConfigError(f"parameter 'model' = {cfg.model!r} is not accepted; use one of: {', '.join(models)}")
    for name in ("epochs", "batch_size", "image_size", "crop_window"):
        _at_least(name, getattr(cfg, name), 1)
    for name in ("subset_per_class", "extra_train_per_class", "source_per_class", "test_source_per_class",
                 "early_stopping_patience",
                 "unfreeze_last", "num_workers", "threads", "seed"):
        _at_least(name, getattr(cfg, name), 0)
    if cfg.unfreeze_last and cfg.freeze != "backbone":
        raise ConfigError(f"parameters 'unfreeze_last' = {cfg.unfreeze_last} and 'freeze' = {cfg.freeze!r} do not go "
                          "together: unfreeze_last names the backbone stages that train again under "
                          "freeze = 'backbone' (with freeze = 'none' every layer trains); set freeze: backbone "
                          "or unfreeze_last: 0")
    if cfg.cv_folds == 1 or (not isinstance(cfg.cv_folds, int) or cfg.cv_folds < 0):
        raise ConfigError(f"parameter 'cv_folds' = {cfg.cv_folds!r} must be 0 (single split) or >= 2")
    _at_least("lr", cfg.lr, 0.0, float)
    if cfg.lr == 0:
        raise ConfigError("parameter 'lr' = 0 must be > 0")
    _at_least("weight_decay", cfg.weight_decay, 0.0, float)
    _fraction("label_smoothing", cfg.label_smoothing)
    _fraction("val_fraction", cfg.val_fraction)
    if cfg.val_fraction == 0:
        raise ConfigError("parameter 'val_fraction' = 0: training needs a validation split for early "
                          "stopping and model choice (test data never steers training); use e.g. 0.1")
    _fraction("test_fraction", cfg.test_fraction)
    _fraction("crop_margin", cfg.crop_margin)
    if cfg.val_fraction + cfg.test_fraction >= 1:
        raise ConfigError("parameters 'val_fraction' + 'test_fraction' must leave data to train on (sum < 1)")
    if cfg.data_dir is not None and not Path(cfg.data_dir).expanduser().is_dir():
        raise ConfigError(f"parameter 'data_dir' = {cfg.data_dir!r}: no such folder")
    if cfg.dataset == "folder" and cfg.data_dir is None:
        raise ConfigError("parameter 'data_dir' is required when dataset = 'folder'")
    if cfg.dataset == "csv":
        if not cfg.csv_path:
            raise ConfigError("parameter 'csv_path' is required when dataset = 'csv'")
        if not Path(cfg.csv_path).expanduser().is_file():
            raise ConfigError(f"parameter 'csv_path' = {cfg.csv_path!r}: no such file")
    if cfg.split_file is not None and not Path(cfg.split_file).expanduser().is_file():
        raise ConfigError(f"parameter 'split_file' = {cfg.split_file!r}: no such file")
    if cfg.crop == "cell" and cfg.dataset != "bccd":
        raise ConfigError("parameter 'crop' = 'cell' needs WBC boxes, which only dataset = 'bccd' has; use crop: none")
    if cfg.cv_folds and cfg.dataset == "kaggle":
        raise ConfigError("parameter 'cv_folds' must be 0 for dataset = 'kaggle': pooling its official TRAIN and "
                          "TEST would leak augmented copies of one cell across folds")
    _check_extra_train(cfg)
    _check_sources(cfg)
    if not isinstance(cfg.drop_classes, list):
        raise ConfigError("parameter 'drop_classes' must be a list of class names")
    return cfg


def _check_extra_train(cfg: TrainConfig) -> None:
    if cfg.extra_train is None:
        if cfg.extra_train_per_class:
            raise ConfigError(f"parameter 'extra_train_per_class' = {cfg.extra_train_per_class} needs extra_train")
        return
    _choice("extra_train", cfg.extra_train, tuple(SAME_IMAGES))
    if cfg.extra_train in SAME_IMAGES.get(cfg.dataset, ()):
        raise ConfigError(f"parameter 'extra_train' = {cfg.extra_train!r} shares images with dataset = "
                          f"{cfg.dataset!r} (the same set, or Kaggle dataset2 made from the BCCD originals): "
                          "its images may be this run's test images (leakage)")


def _check_sources(cfg: TrainConfig) -> None:
    if cfg.dataset != "multi":
        for name in ("sources", "test_source", "source_per_class", "test_source_per_class", "per_source_balanced"):
            if getattr(cfg, name) not in (None, [], 0, False):
                raise ConfigError(f"parameter '{name}' = {getattr(cfg, name)!r} needs dataset = 'multi'")
        return
    if not isinstance(cfg.sources, list) or len(cfg.sources) < 2:
        raise ConfigError(f"parameter 'sources' = {cfg.sources!r} must list at least two of: "
                          f"{', '.join(MULTI_SOURCES)}")
    for name in cfg.sources:
        _choice("sources", name, MULTI_SOURCES)
    labs = [lab_of(name) for name in cfg.sources]
    if len(set(labs)) < len(labs):
        raise ConfigError(f"parameter 'sources' = {cfg.sources!r} names one lab twice")
    if cfg.test_source is not None:
        _choice("test_source", cfg.test_source, tuple(cfg.sources))
    elif cfg.test_source_per_class:
        raise ConfigError(f"parameter 'test_source_per_class' = {cfg.test_source_per_class} needs a test_source "
                          "(the lab held out)")
    if cfg.crop not in MULTI_CROPS:
        raise ConfigError(f"parameter 'crop' = {cfg.crop!r}: dataset = 'multi' crops every lab the same way; "
                          f"use one of: {', '.join(MULTI_CROPS)}")
    for name in ("extra_train", "cv_folds"):
        if getattr(cfg, name):
            raise ConfigError(f"parameter '{name}' = {getattr(cfg, name)!r} is not used with dataset = 'multi' "
                              "(sources lists the sets, test_source the held-out one)")
    if cfg.balanced_sampling and cfg.per_source_balanced:
        raise ConfigError("parameters 'balanced_sampling' and 'per_source_balanced' are two samplers: set one")


FLOAT_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.type == "float")
BOOL_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.type == "bool")


def _coerce_floats(params: dict[str, Any]) -> dict[str, Any]:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; accept it as the number it means."""
    out = dict(params)
    for name in FLOAT_FIELDS:
        value = out.get(name)
        if isinstance(value, str):
            try:
                out[name] = float(value)
            except ValueError:
                raise ConfigError(f"parameter '{name}' = {value!r} must be a number") from None
        elif isinstance(value, int) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def make_config(params: dict[str, Any] | None = None, **overrides: Any) -> TrainConfig:
    """TrainConfig from a dict of parameters (unknown keys are an error), profile applied, validated."""
    merged = {**(params or {}), **overrides}
    unknown = sorted(set(merged) - set(FIELD_NAMES))
    if unknown:
        raise ConfigError(f"unknown parameter(s) {', '.join(unknown)}; accepted: {', '.join(FIELD_NAMES)}")
    merged = _coerce_floats(merged)
    cfg = TrainConfig(**merged)
    _choice("profile", cfg.profile, PROFILES)
    if cfg.profile == "smoke":
        for key, value in smoke_overrides().items():
            current = getattr(cfg, key)
            # 0 means "all images" / "no CV" / "no early stopping": a cap must not turn "all" into 0,
            # and must not switch CV or early stopping on where the experiment has them off.
            if key == "subset_per_class" and current == 0:
                setattr(cfg, key, value)
            elif current:
                setattr(cfg, key, min(current, value))
    return validate(cfg)


# What an ablation's file does not inherit from the experiment it varies: its identity and which builds run it.
NOT_INHERITED = ("name", "title", "ablation_of", "build")


def read_params(path: str | Path, *, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The parameter mapping of a YAML config file, unvalidated (ConfigError names the file).

    A file with ``ablation_of: X`` gives only what it changes: every other parameter comes
    from ``X.yaml`` beside it (itself read this way), except the identity keys
    NOT_INHERITED. So an ablation cannot drift from the experiment it varies.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(params, dict):
        raise ConfigError(f"config file {path} must hold a mapping of parameter: value")
    parent = params.get("ablation_of")
    if not isinstance(parent, str) or not re.fullmatch(PLAIN_NAME, parent):
        return params  # null, or a bad value that make_config names
    parent_path = path.with_name(f"{parent}{path.suffix}")
    if parent_path.resolve() in [p.resolve() for p in (*_seen, path)]:
        raise ConfigError(f"config file {path}: 'ablation_of' = {parent!r} leads back to itself")
    if not parent_path.is_file():
        raise ConfigError(f"config file {path}: 'ablation_of' = {parent!r}, but {parent_path} does not exist; "
                          "an ablation inherits the parameters it leaves out from that file")
    inherited = read_params(parent_path, _seen=(*_seen, path))
    return {**{k: v for k, v in inherited.items() if k not in NOT_INHERITED}, **params}


def load_config(path: str | Path, **overrides: Any) -> TrainConfig:
    return make_config(read_params(path), **overrides)


def config_to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
