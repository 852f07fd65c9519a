"""modeling.rundir.RunDir names every file of a run folder."""
from __future__ import annotations

from bloodcell_lib.modeling.rundir import RunDir


def test_file_names(tmp_path):
    run = RunDir(tmp_path)
    assert run.split == tmp_path / "split.csv" and run.config == tmp_path / "config.yaml"
    assert run.checkpoint_best.name == "checkpoint_best.pt" and run.checkpoint_last.name == "checkpoint_last.pt"
    assert run.history.name == "history.csv" and run.run_info.name == "run_info.json"
    assert run.predictions("test").name == "predictions_test.csv"
    assert run.metrics("test", "tta").name == "metrics_test_tta.json"


def test_folds_in_numeric_order_and_runs(tmp_path):
    run = RunDir(tmp_path)
    assert run.runs() == [run]
    for name in ("fold_10", "fold_2", "fold_x", "notes"):
        (tmp_path / name).mkdir()
    assert [f.path.name for f in run.folds()] == ["fold_2", "fold_10"]
    assert run.runs() == run.folds() and run.fold(2).path == tmp_path / "fold_2"


def test_training_files_present(tmp_path):
    run = RunDir(tmp_path)
    run.history.write_text("epoch\n")
    run.split.write_text("path,label,split\n")
    assert run.training_files_present() == ["history.csv", "split.csv"]
