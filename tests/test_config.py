"""config.py: every bad parameter fails before any work, naming the parameter and what it accepts."""
from __future__ import annotations


import pytest
import yaml

from bloodcell_lib.training import config as C
from bloodcell_lib.training.config import ConfigError, TrainConfig, load_config, make_config


def _error(params: dict) -> str:
    with pytest.raises(ConfigError) as info:
        make_config(params)
    return str(info.value)


def test_defaults_are_valid():
    cfg = make_config({})
    assert cfg == C.validate(TrainConfig())
    assert cfg.run_dir.name == "experiment"


@pytest.mark.parametrize("name, value, accepted", [
    ("dataset", "imagenet", ["kaggle", "bccd", "pbc", "folder", "csv"]),
    ("model", "resnet9000", ["resnet18", "resnet34", "efficientnet_lite0"]),
    ("optimizer", "sgd", ["adam", "adamw"]),
    ("scheduler", "plateau", ["none", "cosine", "onecycle", "step"]),
    ("freeze", "all", ["none", "backbone"]),
    ("monitor", "test_acc", ["val_acc", "val_loss", "val_balanced_acc", "val_macro_f1"]),
    ("augment", "heavy", ["none", "light", "strong"]),
    ("crop", "box", ["none", "cell", "stain"]),
    ("profile", "fast", ["full", "smoke"]),
])
def test_unknown_choice_names_parameter_and_accepted_values(name, value, accepted):
    message = _error({name: value})
    assert f"'{name}'" in message and repr(value) in message
    for option in accepted:
        assert option in message


@pytest.mark.parametrize("name, value", [
    ("epochs", -1), ("epochs", 0), ("image_size", 0), ("image_size", -32), ("batch_size", 0),
    ("subset_per_class", -1), ("early_stopping_patience", -2), ("unfreeze_last", -1),
    ("num_workers", -1), ("threads", -1), ("seed", -5),
])
def test_out_of_range_integers(name, value):
    message = _error({name: value})
    assert f"'{name}'" in message and ">=" in message


@pytest.mark.parametrize("name, value", [("epochs", 2.5), ("image_size", "64"), ("batch_size", True),
                                         ("epochs", None)])
def test_wrong_type_integers(name, value):
    message = _error({name: value})
    assert f"'{name}'" in message and "integer" in message


@pytest.mark.parametrize("name, value", [
    ("lr", 0), ("lr", -0.1), ("weight_decay", -1e-4), ("label_smoothing", 1.0), ("label_smoothing", -0.1),
    ("val_fraction", 1.5), ("test_fraction", -0.2), ("crop_margin", 2.0), ("cv_folds", 1), ("cv_folds", -3),
])
def test_out_of_range_numbers(name, value):
    assert f"'{name}'" in _error({name: value})


def test_fractions_must_leave_training_data():
    message = _error({"val_fraction": 0.5, "test_fraction": 0.5})
    assert "val_fraction" in message and "test_fraction" in message


def test_missing_paths(tmp_path):
    missing = tmp_path / "nowhere"
    message = _error({"dataset": "folder", "data_dir": str(missing)})
    assert "'data_dir'" in message and str(missing) in message and "no such folder" in message
    assert "'data_dir'" in _error({"dataset": "folder"})  # folder needs a data_dir
    message = _error({"dataset": "csv", "csv_path": str(missing / "labels.csv")})
    assert "'csv_path'" in message and "no such file" in message
    assert "'csv_path'" in _error({"dataset": "csv"})


def test_unknown_parameter_lists_accepted_ones():
    message = _error({"learning_rate": 0.1})
    assert "learning_rate" in message and "lr" in message and "epochs" in message


def test_drop_classes_must_be_a_list():
    assert "'drop_classes'" in _error({"drop_classes": "basophil"})


def test_monitor_none_cannot_stop_early():
    assert make_config({"monitor": "none"}).monitor == "none"
    assert "'early_stopping_patience' = 3 needs a metric" in _error({"monitor": "none", "early_stopping_patience": 3})


def test_smoke_profile_shrinks_the_run():
    cfg = make_config({"profile": "smoke", "epochs": 30, "image_size": 224, "cv_folds": 5,
                       "early_stopping_patience": 4})
    assert (cfg.epochs, cfg.image_size, cfg.cv_folds, cfg.early_stopping_patience) == (1, 64, 2, 1)
    assert cfg.subset_per_class == C.smoke_overrides()["subset_per_class"] == 12  # 0 ("all") is capped too
    assert make_config({"profile": "smoke", "subset_per_class": 5}).subset_per_class == 5
    off = make_config({"profile": "smoke"})  # what an experiment has switched off stays off
    assert (off.cv_folds, off.early_stopping_patience) == (0, 0)


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- epochs\n- 3\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listing)


def test_yaml_round_trip_and_overrides(tmp_path):
    cfg = make_config({"name": "rt", "epochs": 3, "drop_classes": ["platelet"], "lr": 0.0003})
    path = tmp_path / "c.yaml"
    path.write_text(C.config_to_yaml(cfg))
    assert load_config(path) == cfg
    again = load_config(path, epochs=5)
    assert again.epochs == 5 and again.lr == 0.0003
    with pytest.raises(ConfigError, match="'epochs'"):
        load_config(path, epochs=-1)


def test_unfreeze_last_needs_a_frozen_backbone():
    """unfreeze_last counts stages that train again under freeze: backbone; with freeze: none it
    used to pass validation and fail in set_trainable, after the data were loaded."""
    message = _error({"freeze": "none", "unfreeze_last": 3})
    assert "'unfreeze_last' = 3" in message and "'freeze' = 'none'" in message
    assert make_config({"freeze": "backbone", "unfreeze_last": 3}).unfreeze_last == 3


def test_run_dir_follows_output_dir(tmp_path):
    cfg = make_config({"name": "abc", "output_dir": str(tmp_path)})
    assert cfg.run_dir == tmp_path / "abc"


def test_cli_rejects_bad_parameters_before_any_work(tmp_path, monkeypatch, capsys):
    """`bloodcell train` exits 2 with the message and never starts training."""
    from bloodcell_lib.training import cli, train

    def no_work(*args, **kwargs):  # pragma: no cover - reaching it is the failure
        raise AssertionError("training started despite a bad parameter")

    monkeypatch.setattr(train, "fit_experiment", no_work)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"name": "cli", "output_dir": str(tmp_path / "runs"), "epochs": 1}))
    cases = [
        (["--config", str(good), "--set", "model=nonexistent_net"], "'model'"),
        (["--config", str(good), "--set", "dataset=mnist"], "'dataset'"),
        (["--config", str(good), "--set", "epochs=-3"], "'epochs'"),
        (["--config", str(good), "--set", "image_size=0"], "'image_size'"),
        (["--config", str(good), "--set", f"data_dir={tmp_path / 'absent'}"], "'data_dir'"),
        (["--config", str(tmp_path / "absent.yaml")], "does not exist"),
        (["--config", str(good), "--set", "epochs"], "key=value"),
        (["--config", str(good), "--set", "colour=red"], "colour"),
        (["--config", str(good), "--set", "freeze=none", "--set", "unfreeze_last=3"], "'unfreeze_last' = 3"),
    ]
    for argv, expected in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err, (argv, err)
    assert not (tmp_path / "runs").exists()


def test_cli_set_values_are_yaml_literals(tmp_path, monkeypatch):
    from bloodcell_lib.training import cli, train

    seen = {}
    monkeypatch.setattr(train, "fit_experiment", lambda cfg, **kw: seen.setdefault("cfg", cfg))
    good = tmp_path / "good.yaml"
    good.write_text("name: lit\nepochs: 2\n")
    assert cli.main(["--config", str(good), "--resume", "--set", "lr=0.01", "--set", "pretrained=false",
                       "--set", "drop_classes=[platelet, ig]", "--set", "output_dir=" + str(tmp_path)]) == 0
    cfg = seen["cfg"]
    assert cfg.lr == 0.01 and cfg.pretrained is False and cfg.drop_classes == ["platelet", "ig"]
    assert cfg.resume is True and cfg.epochs == 2


def test_lr_in_exponent_notation(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text("lr: 1e-3\n")
    assert load_config(path).lr == pytest.approx(1e-3)


def test_booleans_are_type_checked():
    assert "'pretrained'" in _error({"pretrained": "no"})


def test_missing_split_file(tmp_path):
    assert "'split_file'" in _error({"split_file": str(tmp_path / "none.csv")})


def test_val_fraction_zero():
    assert "'val_fraction'" in _error({"val_fraction": 0.0})


def test_name_cannot_escape_runs_folder():
    assert "'name'" in _error({"name": "../outside"})


def test_ablation_of_names_another_experiment():
    assert make_config({}).ablation_of is None
    assert make_config({"name": "pbc-96px", "ablation_of": "pbc"}).ablation_of == "pbc"
    for bad in ("../pbc", "", 3, ["pbc"]):
        message = _error({"name": "pbc-96px", "ablation_of": bad})
        assert "'ablation_of'" in message and repr(bad) in message
    assert "'ablation_of'" in _error({"name": "pbc", "ablation_of": "pbc"})  # not itself


def test_init_from_names_an_experiment_or_a_checkpoint(tmp_path):
    cfg = make_config({"name": "bccd", "init_from": "pbc", "output_dir": str(tmp_path)})
    assert cfg.init_checkpoint == tmp_path / "pbc" / "checkpoint_best.pt"  # beside this run's folder
    assert make_config({"init_from": str(tmp_path / "w.pt")}).init_checkpoint == tmp_path / "w.pt"
    assert make_config({}).init_checkpoint is None
    for bad in ("../pbc", "", 3, "dir/weights.bin"):
        message = _error({"name": "bccd", "init_from": bad})
        assert "'init_from'" in message and repr(bad) in message
    assert "'init_from'" in _error({"name": "bccd", "init_from": "bccd"})  # not itself


def test_an_ablation_file_inherits_what_it_leaves_out_from_its_parent(tmp_path):
    (tmp_path / "base.yaml").write_text("title: Base\ndataset: pbc\nimage_size: 128\nepochs: 7\ninit_from: other\n")
    (tmp_path / "small.yaml").write_text("title: Small\nablation_of: base\nimage_size: 96\ninit_from: null\n")
    (tmp_path / "smaller.yaml").write_text("ablation_of: small\nepochs: 2\n")
    assert C.read_params(tmp_path / "small.yaml") == {
        "dataset": "pbc", "image_size": 96, "epochs": 7, "init_from": None, "title": "Small", "ablation_of": "base"}
    # chains resolve; identity (title) is never inherited
    assert C.read_params(tmp_path / "smaller.yaml") == {
        "dataset": "pbc", "image_size": 96, "epochs": 2, "init_from": None, "ablation_of": "small"}
    cfg = load_config(tmp_path / "small.yaml", name="small")
    assert (cfg.image_size, cfg.epochs, cfg.dataset, cfg.title) == (96, 7, "pbc", "Small")


def test_an_ablation_file_without_its_parent_or_in_a_cycle_is_refused(tmp_path):
    (tmp_path / "orphan.yaml").write_text("ablation_of: missing\n")
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        C.read_params(tmp_path / "orphan.yaml")
    (tmp_path / "a.yaml").write_text("ablation_of: b\n")
    (tmp_path / "b.yaml").write_text("ablation_of: a\n")
    with pytest.raises(ConfigError, match="leads back to itself"):
        C.read_params(tmp_path / "a.yaml")


def test_the_shipped_ablations_differ_from_their_parents_only_where_they_say():
    from bloodcell_lib.build.runner import discover_experiments

    found = discover_experiments()
    for name, experiment in found.items():
        parent = experiment["params"]["ablation_of"]
        if parent is None:
            continue
        own = set(yaml.safe_load(experiment["path"].read_text())) - set(C.NOT_INHERITED)
        differing = {key for key, value in experiment["params"].items()
                     if key not in C.NOT_INHERITED and found[parent]["params"][key] != value}
        assert differing and differing <= own, (name, differing, own)


def test_extra_train_names_another_data_set_that_shares_no_cells():
    cfg = make_config({"dataset": "kaggle", "extra_train": "pbc", "extra_train_per_class": 5})
    assert (cfg.extra_train, cfg.extra_train_per_class) == ("pbc", 5)
    for dataset, extra in (("pbc", "pbc"), ("kaggle", "bccd"), ("bccd", "kaggle")):
        assert "shares images with dataset" in _error({"dataset": dataset, "extra_train": extra})
    assert "use one of: pbc, bccd, kaggle" in _error({"dataset": "pbc", "extra_train": "folder"})
    assert "needs extra_train" in _error({"extra_train_per_class": 5})
    assert "'extra_train_per_class'" in _error({"dataset": "kaggle", "extra_train": "pbc", "extra_train_per_class": -1})


def test_field_knowledge_lives_on_the_fields():
    """Resume, ablation and smoke rules are field metadata; the helpers read them."""
    assert {"name", "epochs", "tta", "threads"} <= C.resume_may_change()
    assert not {"model", "lr", "image_size", "seed", "dataset"} & C.resume_may_change()
    assert C.not_factors() == {"name", "title", "ablation_of", "build", "output_dir", "resume", "num_workers",
                               "threads", "device", "profile"}
    assert C.smoke_overrides() == {"epochs": 1, "image_size": 64, "subset_per_class": 12, "cv_folds": 2,
                                   "early_stopping_patience": 1}


def test_device_auto_is_the_default_and_resolves_to_this_machines_device(monkeypatch):
    """device: auto (CUDA where torch sees a GPU, else the CPU); CPU stays the tested default."""
    import torch

    from bloodcell_lib.core.distributed import resolve_device

    assert make_config({}).device == "auto"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="parameter 'device' = 'cuda'.*no CUDA device"):
        resolve_device("cuda")
    for value in ("cpu", "cuda"):  # accepted by the config; cuda is checked where the run starts
        assert make_config({"device": value}).device == value


def test_a_bad_device_names_the_parameter():
    message = _error({"device": "gpu"})
    assert "parameter 'device' = 'gpu'" in message and "auto, cpu, cuda" in message


def test_device_options_of_the_commands_default_to_auto():
    import argparse

    from bloodcell_lib.core.distributed import device_argument

    assert device_argument("auto") in ("cpu", "cuda:0")
    with pytest.raises(argparse.ArgumentTypeError, match="parameter 'device' = 'tpu'"):
        device_argument("tpu")


def test_build_marks_an_experiment_main_or_ablation_and_is_not_inherited(tmp_path):
    assert make_config({}).build == "main"
    assert "parameter 'build' = 'extra'" in _error({"build": "extra"})
    assert {"build", "device"} <= C.not_factors() and {"build", "device"} <= C.resume_may_change()
    (tmp_path / "main.yaml").write_text("dataset: pbc\nbuild: main\nlr: 0.01\n")
    (tmp_path / "variant.yaml").write_text("ablation_of: main\nbuild: ablation\nimage_size: 96\n")
    (tmp_path / "plain.yaml").write_text("ablation_of: main\nimage_size: 96\n")
    assert C.read_params(tmp_path / "variant.yaml")["build"] == "ablation"
    assert "build" not in C.read_params(tmp_path / "plain.yaml")
