"""What a label budget buys on a leave-one-lab-out run's held-out lab: cells chosen by
``suggest`` against cells drawn at random, and the technologist's workload before and after.

``label_budget_study(run_dir)`` works on the run's held-out lab (the test rows of its
split.csv; classes with fewer than ``MIN_CLASS_CELLS`` cells left out, as every held-out-lab
score does):

1. **the pool**: at most about ``per_class`` cells per class of the lab (whole leakage groups,
   seeded: ``training.adapt.draw_cells``), read at the checkpoint's size. The pool is what a
   technologist would have unlabelled; every chooser picks from it.
2. **choosers**, per budget B (cells labelled in all, any class): ``suggested`` is
   ``suggest``'s choice (``suggest.cell_scores`` then ``suggest.choose``: typical cells of
   B - B//5 k-means clusters of the parent's features plus the B//5 least certain; seed = the
   run's seed), ``random`` is B cells drawn uniformly from the pool, ``random_draws`` times
   (draw d: seed (run seed, d); a smaller budget's cells are the first of a larger one's).
3. **the scored cells of a budget**: the pool minus every cell labelled at that budget by any
   chooser or draw, and minus every cell sharing a leakage group with one of them. So
   suggested and random are scored on the **same** cells at a budget, and no labelled cell is
   ever scored (checked for each chooser and draw); the scored cells differ between budgets
   (``n_scored`` says how many). A budget larger than the pool, or one that leaves nothing to
   score, is skipped and a note says so.
4. **fine-tuning**: the parent checkpoint fine-tuned on the B labelled cells with the
   few-shot recipe (``training.adapt.fine_tune``, ``AdaptRecipe``'s defaults as the few-shot
   study uses them), balanced accuracy over the lab's classes on the scored cells.
5. **workload** (at ``workload_budget``, 25 by default, on that budget's scored cells): the
   share of cells the review flags accept (needs_review false: calibrated confidence and the
   OOD score against the thresholds, as ``evaluate`` scores them; the picture checks of
   ``predict``, no_cell_found and unlike_training_scale, are not applied to these cached
   cells) and the accuracy of the accepted cells, for the parent checkpoint as it is and for
   the model ``adapt --labels`` makes from the suggested cells: fine-tuned with its review
   flags refitted for the lab by cross-fitting (``lab_calibration.refit_for_lab``, the same
   call). Its final fine-tuning is also the suggested row at that budget.

Cost: budgets x (1 + random_draws) fine-tunings plus the 3 cross-fitted ones of the workload
(19 with the defaults), each 12 epochs of at most 50 cells, and a forward pass of the scored
cells per fine-tuning; measured in docs/adapting.md section 5.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from bloodcell_lib.data.sources import MIN_CLASS_CELLS, too_few_cells
from bloodcell_lib.modeling.loaded import LoadedModel, calibration_fields, load_checkpoint
from bloodcell_lib.training.adapt import AdaptRecipe, draw_cells, fine_tune, label_indices_for

BUDGETS = (5, 10, 25, 50)
PER_CLASS = 60
RANDOM_DRAWS = 3
WORKLOAD_BUDGET = 25
SUGGESTED, RANDOM = "suggested", "random"
TABLE_COLUMNS = ["lab", "budget", "chooser", "draw", "balanced_accuracy", "n_scored", "accuracy", "classes_labelled"]
SUMMARY_COLUMNS = ["lab", "budget", "suggested", "random", "random_sd", "gain", "random_draws", "n_scored"]
WORKLOAD_COLUMNS = ["lab", "model", "n_scored", "accepted_share", "accuracy_accepted", "n_accepted",
                    "balanced_accuracy", "flags_fitted_on"]
BEFORE, AFTER = "parent (before adapting)", "adapted on {budget} suggested labels"


@dataclass
class LabelBudgetResult:
    """``table``: one row per budget, chooser and draw (``TABLE_COLUMNS``; suggested has draw 0);
    ``workload``: one row per model (``WORKLOAD_COLUMNS``); ``notes``: skipped budgets and
    anything else a reader must know; ``labelled``: budget, chooser, draw, path of every
    labelled cell and ``scored``: the scored paths per budget (kept here, not in the record)."""

    lab: str
    table: pd.DataFrame
    workload: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    labelled: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["budget", "chooser", "draw", "path"]))
    scored: dict[int, list[str]] = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        """One row per budget: suggested, random (the mean of its draws), their sd, gain
        (suggested - random) and the scored cells."""
        rows = []
        for budget, part in self.table.groupby("budget", sort=True):
            chosen = part.loc[part["chooser"] == SUGGESTED, "balanced_accuracy"]
            drawn = part.loc[part["chooser"] == RANDOM, "balanced_accuracy"]
            suggested = float(chosen.iloc[0]) if len(chosen) else None
            random = float(drawn.mean()) if len(drawn) else None
            rows.append({"lab": self.lab, "budget": int(budget), "suggested": suggested, "random": random,
                         "random_sd": float(drawn.std(ddof=1)) if len(drawn) > 1 else None,
                         "gain": None if suggested is None or random is None else suggested - random,
                         "random_draws": int(len(drawn)), "n_scored": int(part["n_scored"].iloc[0])})
        return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)

    def caption(self) -> str:
        s = self.settings
        return (f"Balanced accuracy on the held-out lab ({self.lab}) against the label budget: cells chosen by "
                f"suggest or at random (mean of {s.get('random_draws')} draws) from a pool of {s.get('n_pool')} "
                "cells; each budget scored on the pool minus every chooser's labelled cells")

    def record(self) -> dict[str, Any]:
        """The experiment record's ``label_budget`` entry (JSON-ready)."""
        return {"lab": self.lab, **self.settings, "seconds": self.seconds, "notes": list(self.notes),
                "rows": _records(self.table), "summary": _records(self.summary()), "workload": _records(self.workload)}

    def record_fields(self) -> dict[str, Any]:
        """``label_budget`` plus the flat numbers the targets read:
        ``label_budget_{suggested,random}_<B>_balanced_accuracy``, ``label_budget_gain_<B>`` and
        ``label_budget_{before,after}_{coverage,accuracy_accepted}``."""
        fields: dict[str, Any] = {"label_budget": self.record()}
        for row in self.summary().to_dict("records"):
            fields[f"label_budget_suggested_{row['budget']}_balanced_accuracy"] = row["suggested"]
            fields[f"label_budget_random_{row['budget']}_balanced_accuracy"] = row["random"]
            fields[f"label_budget_gain_{row['budget']}"] = row["gain"]
        for stage, row in zip(("before", "after"), self.workload.to_dict("records")):
            fields[f"label_budget_{stage}_coverage"] = row["accepted_share"]
            fields[f"label_budget_{stage}_accuracy_accepted"] = row["accuracy_accepted"]
        return fields


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{key: (None if isinstance(value, float) and np.isnan(value) else
                   value.item() if isinstance(value, np.generic) else value) for key, value in row.items()}
            for row in frame.to_dict("records")]


def held_out_pool(run_dir: str | Path, per_class: int, seed: int,
                  min_class_cells: int = MIN_CLASS_CELLS) -> tuple[pd.DataFrame, dict[str, int]]:
    """(the pool: about ``per_class`` cells per class of the run's held-out lab, whole leakage
    groups, seeded; the classes left out for having fewer than ``min_class_cells`` cells)."""
    from bloodcell_lib.data.splits import load_split

    table = load_split(Path(run_dir) / "split.csv")
    held_out = table[table["split"] == "test"].reset_index(drop=True)
    left_out = too_few_cells(held_out["label"], min_class_cells)
    held_out = held_out[~held_out["label"].isin(left_out)].reset_index(drop=True)
    return held_out.iloc[draw_cells(held_out, per_class, seed)].reset_index(drop=True), left_out


def _random_rows(n_pool: int, budget: int, seed: int, draw: int) -> np.ndarray:
    """``budget`` pool rows drawn uniformly (draw ``draw``); a smaller budget takes a prefix."""
    return np.sort(np.random.default_rng([seed, draw]).permutation(n_pool)[:budget])


def _scored_rows(pool: pd.DataFrame, labelled: Sequence[np.ndarray]) -> np.ndarray:
    """Pool rows that no chooser labelled and that share no leakage group with a labelled cell."""
    taken = np.unique(np.concatenate(labelled))
    groups = pool["group"].astype(str) if "group" in pool else pd.Series(pool.index.astype(str))
    out = ~groups.isin(set(groups.iloc[taken])).to_numpy()
    out[taken] = False
    return np.flatnonzero(out)


def _workload_row(lab: str, model_label: str, loaded: LoadedModel, images, y, class_names) -> dict[str, Any]:
    """What ``loaded``'s review flags do on the scored cells (``review.review_summary``)."""
    from bloodcell_lib.evaluation.few_shot import lab_scores
    from bloodcell_lib.evaluation.predict import proba_and_ood, scored_views
    from bloodcell_lib.modeling.review import review_summary

    logits, ood = scored_views(loaded, images)
    proba, ood = proba_and_ood(logits, ood, loaded)
    row = {"lab": lab, "model": model_label, "n_scored": len(y), "accepted_share": None, "accuracy_accepted": None,
           "n_accepted": None, "balanced_accuracy": lab_scores(y, proba, class_names)["balanced_accuracy"],
           "flags_fitted_on": "none: the checkpoint holds no review thresholds"}
    if loaded.review:
        summary = review_summary(proba, y, ood, loaded.review)
        row.update(accepted_share=summary["coverage"], accuracy_accepted=summary["accuracy_accepted"],
                   n_accepted=summary["n_accepted"],
                   flags_fitted_on=f"{loaded.review.get('fitted_on', 'val')} ({loaded.review['ood_score']} score)")
    return row


def _adapted(loaded: LoadedModel, entries: dict[str, Any] | None) -> LoadedModel:
    """``loaded`` as ``load_checkpoint`` reads the checkpoint ``adapt --labels`` writes: the lab's
    refitted entries, or without them the parent's with no feature bank (flags by energy)."""
    if entries is None:
        return replace(loaded, feature_bank=None,
                       **calibration_fields(loaded.calibration, loaded.review, loaded.conformal,
                                            bool(loaded.calibrated), False))
    return replace(loaded, feature_bank=entries["feature_bank"],
                   **calibration_fields(entries["calibration"], entries["review"], entries["conformal"], True, True))


def profile_settings(profile: str) -> dict[str, Any]:
    """``label_budget_study`` keywords for a build profile: the smoke profile checks that the study
    runs (two budgets, one random draw, two fine-tuning epochs), the others measure it."""
    if profile != "smoke":
        return {}
    return {"budgets": (5, 10), "random_draws": 1, "workload_budget": 10, "recipe": AdaptRecipe(epochs=2)}


def label_budget_study(run_dir: str | Path, *, budgets: Sequence[int] = BUDGETS, per_class: int = PER_CLASS,
                       random_draws: int = RANDOM_DRAWS, workload_budget: int | None = WORKLOAD_BUDGET,
                       seed: int | None = None, recipe: AdaptRecipe | None = None, device: str = "cpu",
                       min_class_cells: int = MIN_CLASS_CELLS) -> LabelBudgetResult | None:
    """The label-budget study of a leave-one-lab-out run (module docstring); None when the run's
    kept checkpoint names no ``test_source``. ``seed``: default the run's seed."""
    from bloodcell_lib.modeling.rundir import KEPT_CHECKPOINT
    from bloodcell_lib.evaluation.few_shot import _check_never_scored, _lab_images, lab_scores
    from bloodcell_lib.evaluation.lab_calibration import refit_for_lab
    from bloodcell_lib.evaluation.predict import predict_tensors
    from bloodcell_lib.evaluation.suggest import cell_scores, choose

    started = time.perf_counter()
    budgets = sorted({int(b) for b in budgets})
    if not budgets or budgets[0] < 2 or random_draws < 1 or per_class < 1:
        raise ValueError(f"budgets must be integers >= 2 (cells labelled in all), random_draws and per_class >= 1; "
                         f"got budgets={list(budgets)}, random_draws={random_draws}, per_class={per_class}")
    run_dir = Path(run_dir)
    loaded = load_checkpoint(run_dir / KEPT_CHECKPOINT, device)
    lab = loaded.config.get("test_source")
    if not lab:
        return None
    seed = int(loaded.config.get("seed", 0) if seed is None else seed)
    recipe = (recipe or AdaptRecipe(seed=seed)).check()
    pool, left_out = held_out_pool(run_dir, per_class, seed, min_class_cells)
    pool, images, failed = _lab_images(pool, loaded)
    notes = [f"class {name} left out: {n} cell(s) in the held-out lab (< {min_class_cells})"
             for name, n in left_out.items()]
    notes += [f"skipped {path}: {reason}" for path, reason in failed]
    labels = label_indices_for(pool["label"], loaded.class_names, "label_budget_study")
    y, names = labels.numpy(), loaded.class_names
    model = loaded.model
    parent_state = {name: value.clone() for name, value in model.state_dict().items()}
    features, proba = cell_scores(loaded, images)
    paths = pool["path"].astype(str).tolist()
    rows, workload, labelled_cells, scored_cells = [], [], [], {}
    for budget in budgets:
        if budget > len(pool):
            notes.append(f"budget {budget} skipped: larger than the pool ({len(pool)} cells)")
            continue
        chosen = {(SUGGESTED, 0): np.sort([row for row, _ in choose(features, proba, paths, budget, seed)])}
        chosen.update({(RANDOM, d): _random_rows(len(pool), budget, seed, d) for d in range(random_draws)})
        scored = _scored_rows(pool, list(chosen.values()))
        if len(scored) == 0:
            notes.append(f"budget {budget} skipped: no pool cell is left to score once every chooser's "
                         f"{budget} labelled cells (and their leakage groups) are set aside")
            continue
        scored_cells[budget] = [paths[i] for i in scored]
        for (chooser, draw), labelled in chosen.items():
            _check_never_scored(pool, labelled, scored)
            labelled_cells += [(budget, chooser, draw, paths[i]) for i in labelled]
            model.load_state_dict(parent_state)
            with_workload = chooser == SUGGESTED and budget == workload_budget
            if with_workload:  # what `adapt --labels` does with these labels: flags refitted for the lab
                workload.append(_workload_row(lab, BEFORE, loaded, images[scored], y[scored], names))
                entries, refit_notes, _ = refit_for_lab(loaded, images[labelled], labels[labelled], recipe)
                notes += [f"workload, adapted model: {note}" for note in refit_notes]
            else:
                fine_tune(loaded, images[labelled], labels[labelled], recipe)
            score = lab_scores(y[scored], predict_tensors(loaded, images[scored]), names)
            rows.append({"lab": lab, "budget": budget, "chooser": chooser, "draw": draw,
                         "balanced_accuracy": score["balanced_accuracy"], "n_scored": len(scored),
                         "accuracy": score["accuracy"], "classes_labelled": len(set(y[labelled]))})
            if with_workload:
                workload.append(_workload_row(lab, AFTER.format(budget=budget), _adapted(loaded, entries),
                                              images[scored], y[scored], names))
    model.load_state_dict(parent_state)
    if workload_budget is not None and not workload:
        notes.append(f"workload not measured: budget {workload_budget} was not run or was skipped")
    settings = {"run_dir": str(run_dir), "budgets": budgets, "per_class": per_class, "n_pool": len(pool),
                "pool_per_class": {str(c): int(n) for c, n in pool["label"].value_counts().sort_index().items()},
                "random_draws": random_draws, "seed": seed, "workload_budget": workload_budget,
                "recipe": asdict(recipe), "classes_left_out": left_out, "min_class_cells": min_class_cells}
    return LabelBudgetResult(lab, pd.DataFrame(rows, columns=TABLE_COLUMNS),
                             pd.DataFrame(workload, columns=WORKLOAD_COLUMNS), notes, settings,
                             time.perf_counter() - started,
                             pd.DataFrame(labelled_cells, columns=["budget", "chooser", "draw", "path"]), scored_cells)
