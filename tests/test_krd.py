"""KRD-WBC (Erbil), the fourth lab: its loader on the real folder, `multi` and the experiments
with it, a class of one picture kept in train and reported (split, run_info.json, audit), and
leave-one-lab-out scores that leave out a class the held-out lab has fewer than 10 cells of."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import real_data

from bloodcell_lib.data import audit, sources
from bloodcell_lib.data.catalog import DATASETS, MULTI_SOURCES, SAME_IMAGES
from bloodcell_lib.data.datasets import detect, load_manifest
from bloodcell_lib.data.multisource import load_multi
from bloodcell_lib.data.splits import make_splits, placement_entries, source_splits
from bloodcell_lib.evaluation import crosslab, few_shot
from bloodcell_lib.training.config import load_config, make_config

KRD_COUNTS = {"basophil": 1, "eosinophil": 11, "lymphocyte": 228, "monocyte": 39, "neutrophil": 299}
EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


@pytest.fixture(scope="module")
def krd():
    real_data("krd", "KRD_WBC")
    return load_manifest("krd")


def test_krd_is_a_lab_of_its_own():
    assert "krd" in DATASETS and "krd" in MULTI_SOURCES
    assert sources.lab_of("krd") == "erbil-krd" and SAME_IMAGES["krd"] == ("krd",)
    assert crosslab.LAB_OF["krd"] == "krd"
    (target,) = [source for source in crosslab.TARGET_SOURCES if source.name == "krd"]
    assert target.lab == "krd" and target.min_class_cells == sources.MIN_CLASS_CELLS == 10
    assert "10.17632/jzdj6h7gms.2" in target.description  # CC BY 4.0: cited wherever it is shown


def test_too_few_cells():
    assert sources.too_few_cells(["a"] * 10 + ["b"] * 9 + ["c"]) == {"b": 9, "c": 1}
    assert sources.too_few_cells(["a", "b"], 0) == {}


# --------------------------------------------------------------------------- the real folder
@pytest.mark.integration
def test_real_krd(krd):
    table = krd.table
    assert len(table) == 578 and krd.classes == list(sources.SHARED_CLASSES)
    assert table["label"].value_counts().to_dict() == KRD_COUNTS
    assert (table["source"] == "krd").all() and table["group"].nunique() == 578  # group = file
    assert krd.dropped.empty and krd.root.name == "KRD_WBC"
    # the layouts: the data root, the set's folder itself, and detection of both
    assert len(load_manifest("krd", real_data("krd", "KRD_WBC")).table) == 578
    assert detect(real_data("krd")) == ["krd"]


@pytest.mark.integration
def test_audit_names_the_small_classes(krd):
    small = dataclasses.replace(krd, table=krd.table.groupby("label").head(12))  # decode few pictures
    report = audit.audit_manifest(small)
    assert report["small_classes"] == {"basophil": 1}
    assert "basophil: 1" in audit.format_report(report)


@pytest.mark.integration
def test_a_class_of_one_picture_trains_and_is_reported(krd):
    split = make_splits(krd.table, val_fraction=0.1, test_fraction=0.2, seed=0)
    basophil = split[split["label"] == "basophil"]
    assert list(basophil["split"]) == ["train"]
    assert set(split.loc[split["label"] == "eosinophil", "split"]) == {"train", "val", "test"}
    entries = placement_entries(split)
    assert entries[["item", "kind"]].values.tolist() == [["krd class basophil", "train-only"]]
    assert "1 picture(s)" in entries["reason"][0] and "none in val or test" in entries["reason"][0]


@pytest.fixture(scope="module")
def multi(krd):
    real_data("lisc")
    return load_multi(["lisc", "krd"], crop="none", per_class=12, seed=0)


@pytest.mark.integration
def test_multi_with_krd(multi):
    counts = multi.table.groupby("source")["label"].value_counts()
    assert counts["krd"].to_dict() == {"basophil": 1, "eosinophil": 11, "lymphocyte": 12, "monocyte": 12,
                                       "neutrophil": 12}
    assert multi.table.loc[multi.table["source"] == "krd", "group"].str.startswith("krd:").all()
    general = source_splits(multi.table, test_source=None, val_fraction=0.15, test_fraction=0.2, seed=0)
    entries = placement_entries(general)
    assert entries[["item", "kind"]].values.tolist() == [["krd class basophil", "train-only"]]
    lolo = source_splits(multi.table, test_source="krd", val_fraction=0.15, test_fraction=0.2, seed=0)
    assert (lolo.loc[lolo["source"] == "krd", "split"] == "test").all()
    entries = placement_entries(lolo, test_source="krd")
    assert entries[["item", "kind"]].values.tolist() == [["krd class basophil", "unscored-class"]]
    assert "fewer than 10" in entries["reason"][0]


def test_experiments_train_on_the_other_three_labs():
    four = ["pbc", "bccd", "lisc", "krd"]
    for name in ("lolo-pbc", "lolo-bccd", "lolo-lisc", "lolo-krd", "general",
                 "lolo-pbc-color-norm", "lolo-bccd-color-norm", "lolo-lisc-color-norm",
                 "lolo-lisc-no-color", "lolo-lisc-no-scale"):
        cfg = load_config(EXPERIMENTS / f"{name}.yaml")
        assert cfg.sources == four, name
    lolo_krd = load_config(EXPERIMENTS / "lolo-krd.yaml")
    assert lolo_krd.test_source == "krd" and sources.trained_sources(lolo_krd.to_dict()) == ["pbc", "bccd", "lisc"]
    assert load_config(EXPERIMENTS / "general.yaml").test_source is None
    cfg = make_config({"dataset": "multi", "sources": ["lisc", "krd"], "test_source": "krd", "model": "resnet18"})
    assert crosslab.trained_labs(cfg.to_dict()) == {"lisc"}


@pytest.mark.integration
def test_smoke_fit_on_krd_lists_the_class_of_one_in_run_info(tmp_path, krd):
    from bloodcell_lib.training import train

    cfg = make_config(dict(name="krd-tiny", dataset="krd", output_dir=str(tmp_path / "runs"), model="resnet18",
                           pretrained=False, image_size=32, batch_size=16, epochs=1, subset_per_class=10,
                           val_fraction=0.1, test_fraction=0.2, augment="light", threads=1, seed=0,
                           use_cache=False))
    result = train.fit(cfg, progress=False)
    info = json.loads((result.run_dir / "run_info.json").read_text())
    listed = [entry for entry in info["dropped_images"] if entry["item"] == "krd class basophil"]
    assert [entry["kind"] for entry in listed] == ["train-only"], info["dropped_images"]
    split = pd.read_csv(result.run_dir / "split.csv")
    assert split.loc[split["label"] == "basophil", "split"].tolist() == ["train"]


# --------------------------------------------------------------------------- held-out lab scores
def test_score_leaves_out_classes_under_the_minimum():
    names = ["basophil", "eosinophil", "lymphocyte"]
    labels = ["basophil"] + ["eosinophil"] * 10 + ["lymphocyte"] * 10
    proba = np.eye(3)[[1] + [1] * 10 + [2] * 10]  # the basophil answered wrongly: left out, no harm
    score = crosslab.score_restricted(proba, names, labels, min_class_cells=10)
    assert score["classes_left_out"] == {"basophil": 1} and score["min_class_cells"] == 10
    assert score["classes"] == ["eosinophil", "lymphocyte"] and score["n"] == 20
    assert score["balanced_accuracy"] == 1.0
    everything = crosslab.score_restricted(proba, names, labels)
    assert everything["classes_left_out"] == {} and everything["balanced_accuracy"] < 1.0
    frame = crosslab.detail_frame([{**score, "experiment": "lolo-krd", "test_source": "krd", "seconds": 1.0}])
    assert frame.loc[0, "classes left out"] == "basophil (1 < 10 cells)"
    assert {"min_class_cells", "classes_left_out"} <= set(crosslab.RECORD_KEYS)


def test_evaluate_scores_a_held_out_lab_on_its_classes_of_ten():
    from bloodcell_lib.evaluation.evaluate import _held_out_lab_score

    names = ["basophil", "eosinophil", "lymphocyte"]
    labels = ["basophil"] + ["eosinophil"] * 10 + ["lymphocyte"] * 12
    score = _held_out_lab_score(np.eye(3)[[0] + [1] * 10 + [2] * 12], names, labels, "krd")
    assert score["test_source"] == "krd" and score["classes_left_out"] == {"basophil": 1}
    assert score["n"] == 22 and "fewer than 10 cells" in score["why_left_out"]


def test_few_shot_study_of_the_held_out_lab_leaves_small_classes_out(tmp_path, monkeypatch):
    from bloodcell_lib.data.splits import save_split

    rows = [(f"/x/{label}{i}.jpg", label) for label, n in (("basophil", 1), ("eosinophil", 11), ("monocyte", 12))
            for i in range(n)]
    table = pd.DataFrame(rows, columns=["path", "label"]).assign(split="test", source="krd", box=None)
    table["group"] = table["path"]
    save_split(table, tmp_path / "split.csv")
    seen = {}

    def study(checkpoint, held_out, k_values, **kwargs):
        seen["table"] = held_out
        return {"rows": []}

    monkeypatch.setattr(few_shot, "few_shot_study", study)
    cfg = make_config({"dataset": "multi", "sources": ["lisc", "krd"], "test_source": "krd", "model": "resnet18",
                       "output_dir": str(tmp_path.parent), "name": tmp_path.name})
    record = few_shot.held_out_lab_study(cfg)
    assert set(seen["table"]["label"]) == {"eosinophil", "monocyte"}
    assert record["classes_left_out"] == {"basophil": 1} and record["min_class_cells"] == 10


@pytest.mark.integration
def test_cross_lab_score_on_real_krd_cells_leaves_the_basophil_out(tmp_path, krd):
    from tests.test_crosslab import make_checkpoint

    sample = krd.table.groupby("label").head(10).reset_index(drop=True)
    source = crosslab.TargetSource("krd-sample", "krd", "10 KRD cells per class (1 basophil)",
                                   lambda crop, margin: crosslab._with_stain(sample, crop, margin))
    run = tmp_path / "pbc-tiny"
    run.mkdir()
    make_checkpoint(run / "checkpoint_best.pt", {"dataset": "pbc"})
    (record,) = crosslab.score_other_labs(run, sources=[source], num_workers=0).records
    assert record["classes_left_out"] == {"basophil": 1} and record["n"] == 40
    assert "basophil" not in record["per_class_recall"]
    fields = crosslab.record_fields(crosslab.CrossLabResult([record], []))
    assert fields["cross_lab"][0]["classes_left_out"] == {"basophil": 1}
