"""The study's targets (study.yaml) against a metrics document: met, not met, or why not
assessed (smoke profile, partial build, a run with other settings than the target needs)."""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from bloodcell_lib.reporting.formatting import format_score
from bloodcell_lib.reporting.records import as_number, left_out_note, run_config
from bloodcell_lib.reporting.study import TARGETS

# Fields of every targets_table row (tests and readers rely on these names).
TARGET_FIELDS = ("target", "experiment", "metric", "op", "threshold", "value", "sd", "met", "status", "published")


def metric_value(record: Mapping[str, Any], metric: str) -> Any:
    """``record[metric]``; a dotted name (``strangers.lisc.auroc.knn``) walks nested entries.
    None where a step is missing."""
    if metric in record:
        return record[metric]
    value: Any = record
    for step in metric.split("."):
        if not isinstance(value, Mapping) or step not in value:
            return None
        value = value[step]
    return value


def _profile(document: Mapping[str, Any], record: Mapping[str, Any] | None = None) -> str | None:
    return (record or {}).get("profile") or document.get("profile")


def _target_status(target: Mapping[str, Any], document: Mapping[str, Any],
                   records: Mapping[str, Mapping[str, Any]]) -> tuple[float | None, float | None, bool | None, str]:
    """(value, sd, met, status) of one target."""
    sd = None
    if target["experiment"] is None:  # the whole build
        value = as_number(document.get(target["metric"]))
        profile = _profile(document)
        if value is None:
            return None, None, None, "not run (no ./run_all.sh build recorded)"
        if profile != "full":
            return value, None, None, f"not assessed ({profile or 'unknown'} profile)"
        build = document.get("build") or {}
        if build.get("cold") is False:  # reused work or --only: not a cold full build
            rows = build.get("notebooks") or []
            kept = f"; {len(document['kept'])} experiment(s) kept from earlier (--only)" if document.get("kept") else ""
            return value, None, None, f"not measured: {build.get('reused', 0)} of {len(rows)} notebooks reused{kept}"
        if document.get("kept"):
            return value, None, None, f"not assessed (partial build: {', '.join(document['kept'])} kept from earlier)"
        if document.get("build_finished") is False and value <= target["threshold"]:
            return value, None, None, "pending (the build was still running; the final time is in index.html)"
    else:
        record = records.get(target["experiment"])
        left_out = left_out_note(document, target["experiment"], record)
        if record is None:
            return None, None, None, f"not run: {left_out}" if left_out else "not run"
        value = as_number(metric_value(record, target["metric"]))
        sd = as_number(record.get(f"{target['metric']}_sd"))
        if left_out:
            return value, sd, None, f"not assessed: {left_out}"
        profile = _profile(document, record)
        if profile != "full":
            return value, sd, None, f"not assessed ({profile or 'unknown'} profile)"
        config = run_config(record)
        wrong = [f"{key} = {json.dumps(want)} (this run: {json.dumps(config.get(key))})"
                 for key, want in target["requires"].items() if config.get(key) != want]
        if wrong:
            return value, sd, None, "not assessed (needs " + "; ".join(wrong) + ")"
        if value is None:
            return None, None, None, f"not assessed (the record has no {target['metric']})"
    met = value >= target["threshold"] if target["op"] == ">=" else value <= target["threshold"]
    if not met and target.get("or_within") and target["experiment"] is not None:
        return value, sd, *_within_reference(value, target["or_within"], document, records)
    return value, sd, met, "MET" if met else "NOT MET"


def _within_reference(value: float, within: Mapping[str, Any], document: Mapping[str, Any],
                      records: Mapping[str, Mapping[str, Any]]) -> tuple[bool, str]:
    """(met, status) of a target whose threshold was missed but that also counts as met within
    ``within["points"]`` of another (full-profile) record's number (``or_within``: experiment,
    metric, points), e.g. a held-out lab's score against the general model's in-lab score of that lab."""
    points = f"{within['points'] * 100:g} points"
    record = records.get(within["experiment"])
    reference = as_number(metric_value(record, within["metric"])) if record else None
    if reference is None or _profile(document, record) != "full":
        return False, f"NOT MET (and no full-profile {within['experiment']} {within['metric']} to be within {points} of)"
    if value >= reference - within["points"]:
        return True, f"MET (within {points} of {within['experiment']}'s {within['metric']} {reference:.3f})"
    return False, f"NOT MET (more than {points} below {within['experiment']}'s {within['metric']} {reference:.3f})"


def targets_table(document: Mapping[str, Any], targets: Sequence[Mapping[str, Any]] = TARGETS) -> list[dict[str, Any]]:
    """One row per target: ``target``, ``experiment`` (None: the whole build), ``metric``,
    ``op``, ``threshold``, ``value`` (``sd``: over folds), ``met`` (True / False / None when not
    assessed), ``status`` (``MET``, ``NOT MET``, ``not run``, ``not assessed (smoke profile)``,
    ...) and ``published``. ``document``: a metrics document (``experiments``, ``profile``,
    ``build_seconds``, ...)."""
    records = {r["name"]: r for r in document.get("experiments", [])}
    rows = []
    for target in targets:
        value, sd, met, status = _target_status(target, document, records)
        rows.append({"target": target["target"], "experiment": target["experiment"], "metric": target["metric"],
                     "op": target["op"], "threshold": target["threshold"], "value": value, "sd": sd, "met": met,
                     "status": status, "published": target["published"], "or_within": target.get("or_within")})
    return rows


def _target_text(row: Mapping[str, Any], value: Any, sd: Any = None) -> str:
    if row["metric"] == "build_seconds":
        return "" if value is None else f"{value / 60:.1f} min"
    return format_score(value, sd)


def targets_frame(rows: Sequence[Mapping[str, Any]]):
    """targets_table rows as display text (one DataFrame, used by index.html and 04_report)."""
    import pandas as pd

    symbols = {">=": "\u2265", "<=": "\u2264"}
    def within(row: Mapping[str, Any]) -> str:
        other = row.get("or_within")
        return (f" or within {other['points'] * 100:g} points of {other['experiment']}'s {other['metric']}"
                if other else "")

    out = [{"target": row["target"], "experiment": row["experiment"] or "(whole build)",
            "needed": f"{symbols[row['op']]} {_target_text(row, row['threshold'])}{within(row)}",
            "result": _target_text(row, row["value"], row["sd"]), "status": row["status"],
            "published": row["published"]} for row in rows]
    return pd.DataFrame(out, columns=["target", "experiment", "needed", "result", "status", "published"])


def targets_summary(rows: Sequence[Mapping[str, Any]]) -> str:
    """'2 of 6 targets met, 3 not met, 1 not assessed or not run.'"""
    met = sum(1 for r in rows if r["met"] is True)
    missed = sum(1 for r in rows if r["met"] is False)
    rest = len(rows) - met - missed
    return (f"{met} of {len(rows)} targets met, {missed} not met"
            + (f", {rest} not assessed or not run" if rest else "") + ".")

