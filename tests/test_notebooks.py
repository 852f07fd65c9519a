"""The notebooks as source files: a literal-only `parameters` cell first, the `bloodcell`
kernel, no tqdm.auto, no stored outputs, parameters that match TrainConfig and the experiments."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import nbformat
import pytest
import yaml

from bloodcell_lib.training.config import FIELD_NAMES, TrainConfig

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
EXPERIMENT_NOTEBOOKS = ("01_explore", "02_train", "03_evaluate")
ALL = (*EXPERIMENT_NOTEBOOKS, "04_report", "05_count")


def load(name: str):
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def parameters(nb) -> dict:
    """name -> literal value of the parameters cell; fails on anything but `name = literal`."""
    cell = nb.cells[0]
    tree = ast.parse(cell.source)
    values = {}
    for node in tree.body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name), \
            f"parameters cell: only `name = literal` lines allowed, got: {ast.unparse(node)}"
        try:
            values[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            pytest.fail(f"parameters cell: {node.targets[0].id} is not a plain literal: {ast.unparse(node.value)}")
    return values


@pytest.mark.parametrize("name", ALL)
def test_first_cell_is_a_literal_parameters_cell(name):
    nb = load(name)
    nbformat.validate(nb)
    first = nb.cells[0]
    assert first.cell_type == "code" and "parameters" in first.metadata.get("tags", [])
    assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1
    assert parameters(nb)


@pytest.mark.parametrize("name", ALL)
def test_kernel_is_bloodcell(name):
    spec = load(name).metadata["kernelspec"]
    assert spec["name"] == "bloodcell" and spec["language"] == "python"


@pytest.mark.parametrize("name", ALL)
def test_source_notebooks_are_clean_and_thin(name):
    nb = load(name)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        assert not cell.outputs and cell.execution_count is None, f"{name}: stored outputs (clear them)"
        for banned in ("tqdm.auto", "tqdm.notebook", "autonotebook", "from tqdm import auto"):
            assert banned not in cell.source, f"{name}: uses {banned} (plain tqdm only)"
        assert len(cell.source.splitlines()) <= 40 or "parameters" in cell.metadata.get("tags", []), \
            f"{name}: a long code cell; move the logic into bloodcell_lib"
        ast.parse(cell.source)


@pytest.mark.parametrize("name", EXPERIMENT_NOTEBOOKS)
def test_experiment_parameters_are_the_trainconfig_fields(name):
    params = parameters(load(name))
    assert set(params) == set(FIELD_NAMES), (
        f"missing: {sorted(set(FIELD_NAMES) - set(params))}, extra: {sorted(set(params) - set(FIELD_NAMES))}")
    TrainConfig(**params)  # the defaults make a config


def test_experiment_notebooks_share_defaults_equal_to_pbc_yaml():
    defaults = [parameters(load(name)) for name in EXPERIMENT_NOTEBOOKS]
    assert defaults[0] == defaults[1] == defaults[2]
    pbc = yaml.safe_load((ROOT / "experiments" / "pbc.yaml").read_text())
    for key, value in pbc.items():
        assert defaults[0][key] == value, f"notebook default {key} = {defaults[0][key]!r}, pbc.yaml: {value!r}"
    assert defaults[0]["name"] == "pbc"


def test_every_experiment_key_is_a_notebook_parameter():
    params = set(parameters(load("01_explore")))
    for path in sorted((ROOT / "experiments").glob("*.yaml")):
        keys = set(yaml.safe_load(path.read_text()) or {})
        assert keys <= params, f"{path.name}: {sorted(keys - params)} are not notebook parameters"


def test_report_notebook_parameters():
    params = parameters(load("04_report"))
    assert set(params) == {"title", "profile", "experiments"}
    assert params["experiments"] == []


def test_library_uses_plain_tqdm_only():
    for path in (ROOT / "bloodcell_lib").rglob("*.py"):
        text = path.read_text()
        for banned in ("tqdm.auto", "tqdm.notebook", "tqdm.autonotebook"):
            assert f"from {banned}" not in text and f"import {banned}" not in text, f"{path}: {banned}"


def test_notebooks_are_valid_json_with_cell_ids():
    for name in ALL:
        data = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())
        assert data["nbformat"] == 4 and data["nbformat_minor"] >= 5
        assert all("id" in c for c in data["cells"])


@pytest.mark.parametrize("name", ALL)
def test_notebooks_import_the_display_helpers_first(name):
    """notebook_display sets the warnings filter that keeps the reports clean: imported first."""
    first_code = next(c for c in load(name).cells[1:] if c.cell_type == "code")
    assert first_code.source.startswith("from bloodcell_lib.reporting import notebook_display  # first")


def test_evaluate_scores_without_and_with_tta_and_records_both():
    source = "\n".join(c.source for c in load("03_evaluate").cells if c.cell_type == "code")
    assert 'plain, with_tta = evaluate.evaluate_plain_and_tta(cfg.run_dir, split="test")' in source
    assert "no_tta=plain.metrics, tta=with_tta.metrics" in source


def test_report_notebook_shows_targets_and_ablation():
    source = "\n".join(c.source for c in load("04_report").cells)
    for needed in ("## Targets", 'reporting.targets_frame(doc["targets"])', "## Ablation",
                   'reporting.ablation_frame(doc["ablation"])'):
        assert needed in source
