"""The ablation table: which technique bought which accuracy or speed (test-time augmentation
off / on, each ablation experiment against the experiment it varies, the training-path
benchmark)."""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

from bloodcell_lib.reporting.formatting import cell_text, format_score
from bloodcell_lib.reporting.records import as_number, left_out_note, run_config
from bloodcell_lib.reporting.throughput import THROUGHPUT_FILE, load_throughput, trained_layers_text

TRAINING_PATH_FACTOR = ("training path: naive PIL loop vs project path (cache + tensor augmentation + channels_last, "
                        "early stages frozen)")
TTA_FACTOR = "test-time augmentation (8 dihedral views)"
ABLATION_FIELDS = ("experiment", "factor", "setting", "accuracy", "accuracy_sd", "macro_f1", "macro_f1_sd",
                   "train_seconds", "images_per_second", "note")


def _settings_of(record: Mapping[str, Any], parent: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two records' settings to compare: the parameters as the experiments asked for them
    (before the profile) when both records have them, else the configs the runs used."""
    prov, parent_prov = record.get("provenance") or {}, parent.get("provenance") or {}
    if prov.get("parameters") and parent_prov.get("parameters"):
        return dict(prov["parameters"]), dict(parent_prov["parameters"])
    return run_config(record), run_config(parent)


def changed_settings(record: Mapping[str, Any], parent: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """key -> (this record's value, the parent's) of every setting that differs, in field order;
    names, folders and execution settings (``config.not_factors``) are not factors."""
    from bloodcell_lib.training.config import not_factors

    skip = not_factors()
    mine, theirs = _settings_of(record, parent)
    keys = [*mine, *(k for k in theirs if k not in mine)]
    return {k: (mine.get(k), theirs.get(k)) for k in keys if k not in skip and mine.get(k) != theirs.get(k)}


def _setting_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _scores(source: Mapping[str, Any] | None) -> dict[str, Any]:
    source = source or {}
    return {key: as_number(source.get(key)) for key in ("accuracy", "accuracy_sd", "macro_f1", "macro_f1_sd")}


def _ablation_row(experiment: str | None, factor: str, setting: str, scores: Mapping[str, Any] | None = None, *,
                  train_seconds: Any = None, images_per_second: Any = None, note: str = "") -> dict[str, Any]:
    return {"experiment": experiment, "factor": factor, "setting": setting, **_scores(scores),
            "train_seconds": as_number(train_seconds), "images_per_second": as_number(images_per_second),
            "note": note}


def _tta_rows(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    name, used = record["name"], bool((record.get("provenance") or {}).get("tta"))
    if not record.get("no_tta") or not record.get("tta"):
        return [_ablation_row(name, TTA_FACTOR, "not measured",
                              note="the record has no no_tta / tta scores (rerun 03_evaluate)")]
    return [_ablation_row(name, TTA_FACTOR, setting, record[key], train_seconds=record.get("train_seconds"),
                          note="headline numbers (config tta: " + json.dumps(on) + ")" if on == used else "")
            for key, setting, on in (("no_tta", "off", False), ("tta", "on", True))]


def _variant_rows(record: Mapping[str, Any], parent: Mapping[str, Any]) -> list[dict[str, Any]]:
    changed = changed_settings(record, parent)
    if not changed:
        return [_ablation_row(record["name"], f"(no setting differs from {parent['name']})", "", record,
                              train_seconds=record.get("train_seconds"), note=f"ablation of {parent['name']}")]
    factor = "; ".join(f"{k} {_setting_text(a)} vs {_setting_text(b)}" for k, (a, b) in changed.items())
    mine, theirs = run_config(record), run_config(parent)
    same = [f"{k} {_setting_text(mine.get(k))}" for k in changed if k in mine and mine.get(k) == theirs.get(k)]
    ran = (f"; under the {record.get('profile')} profile both ran with " + ", ".join(same)) if same else ""
    return [_ablation_row(parent["name"], factor, "; ".join(f"{k} {_setting_text(b)}" for k, (_, b) in changed.items()),
                          parent, train_seconds=parent.get("train_seconds"), note="the experiment varied" + ran),
            _ablation_row(record["name"], factor, "; ".join(f"{k} {_setting_text(a)}" for k, (a, _) in changed.items()),
                          record, train_seconds=record.get("train_seconds"),
                          note=f"ablation of {parent['name']}" + ran)]


def _throughput_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    result, why = load_throughput(path)
    if result is None:
        return [_ablation_row("benchmark", TRAINING_PATH_FACTOR, "not measured", note=why)]
    settings, summary, machine = result.get("settings") or {}, result.get("summary") or {}, result.get("machine") or {}
    naive, project = result.get("naive") or {}, result.get("project") or {}
    where = (f"benchmarks/throughput.py of {str(result.get('written', '?'))[:10]} on "
             f"{machine.get('processor') or machine.get('machine') or '?'}, {machine.get('device', '?')}, "
             f"{machine.get('cpus_usable', machine.get('cpu_count', '?'))} CPU(s): {settings.get('model')} at "
             f"{settings.get('image_size')} px, {settings.get('train_images')} train / {settings.get('val_images')} "
             f"val images of {settings.get('dataset')}, {settings.get('epochs')} epochs; accuracy = val accuracy "
             f"of the benchmark, images/s = steady-state training passes")
    busy = "; WARNING: the machine was busy, timings not representative" if result.get("busy_warning") else ""

    def train_seconds(part: Mapping[str, Any]) -> float:
        """Training passes of one run, plus its cache build (the naive loop has none)."""
        return (sum(float(e.get("train_pass_seconds") or 0) for e in (part.get("epochs") or []))
                + float(part.get("cache_seconds") or 0))

    def project_row(part: Mapping[str, Any], what: str, rate_key: str, speedup_key: str) -> dict[str, Any]:
        speedup = as_number(summary.get(speedup_key))
        return _ablation_row("benchmark", TRAINING_PATH_FACTOR,
                             f"project path (cache + tensor augmentation + channels_last, {what})",
                             {"accuracy": part.get("val_acc")}, train_seconds=train_seconds(part),
                             images_per_second=summary.get(rate_key),
                             note=(f"speed-up {speedup:.2f}x" if speedup is not None else "")
                                  + "; train seconds include the cache build" + busy)

    rows = [
        _ablation_row("benchmark", TRAINING_PATH_FACTOR, "naive PIL loop (decode + augment every epoch, NCHW, "
                      "all layers trained)", {"accuracy": naive.get("val_acc")}, train_seconds=train_seconds(naive),
                      images_per_second=summary.get("naive_steady_images_per_second"), note=where + busy),
        project_row(project, trained_layers_text(settings), "project_steady_images_per_second", "speedup_steady"),
    ]
    if result.get("project_all_layers"):
        rows.append(project_row(result["project_all_layers"], "all layers trained",
                                "project_all_layers_steady_images_per_second", "speedup_all_layers_steady"))
    return rows


def ablation_table(document: Mapping[str, Any], *,
                   throughput: str | os.PathLike = THROUGHPUT_FILE) -> list[dict[str, Any]]:
    """Which technique bought which accuracy or speed. Rows ``experiment``, ``factor``,
    ``setting``, ``accuracy`` / ``macro_f1`` (with ``_sd`` over folds), ``train_seconds``,
    ``images_per_second``, ``note``:

    * every main experiment: test-time augmentation off and on (its record's ``no_tta`` and
      ``tta`` scores of the same checkpoint);
    * every ablation experiment (``ablation_of`` names its parent): the parent and the
      ablation, the factor being the settings that differ (``changed_settings``);
    * the training path, naive loop against the project's (from ``throughput``, written by
      benchmarks/throughput.py; a row saying how to make it when absent).

    An experiment the build left out (metrics.json ``left_out``: an ablation under the default
    full profile) says so in its rows' note, with the commit its numbers come from, or gets a
    row of its own when no earlier record of it is there.
    """
    records = list(document.get("experiments", []))
    by_name = {r["name"]: r for r in records}
    rows: list[dict[str, Any]] = []
    for record in records:
        if record.get("ablation_of"):
            continue
        rows.extend(_tta_rows(record))
        for variant in records:
            if variant.get("ablation_of") == record["name"]:
                rows.extend(_variant_rows(variant, record))
    for variant in records:
        parent = variant.get("ablation_of")
        if parent and parent not in by_name:
            rows.append(_ablation_row(variant["name"], "(parent not run)", "", variant,
                                      train_seconds=variant.get("train_seconds"),
                                      note=f"ablation of {parent}, which has no record in this build"))
        elif parent and by_name[parent].get("ablation_of"):
            rows.extend(_variant_rows(variant, by_name[parent]))
    for row in rows:
        note = left_out_note(document, row["experiment"], by_name.get(row["experiment"]))
        if note:
            row["note"] = f"{row['note']}; {note}" if row["note"] else note
    rows.extend(_ablation_row(name, "(left out of this build)", "", note=left_out_note(document, name))
                for name in (document.get("left_out") or {}) if name not in by_name)
    rows.extend(_throughput_rows(throughput))
    return rows


def ablation_frame(rows: Sequence[Mapping[str, Any]]):
    """ablation_table rows as display text (index.html and 04_report)."""
    import pandas as pd

    out = [{"experiment": row["experiment"], "factor": row["factor"], "setting": row["setting"],
            "accuracy": format_score(row["accuracy"], row["accuracy_sd"]),
            "macro-F1": format_score(row["macro_f1"], row["macro_f1_sd"]),
            "train s": cell_text(row["train_seconds"]), "images/s": cell_text(row["images_per_second"]),
            "note": row["note"]} for row in rows]
    return pd.DataFrame(out, columns=["experiment", "factor", "setting", "accuracy", "macro-F1", "train s",
                                      "images/s", "note"])

