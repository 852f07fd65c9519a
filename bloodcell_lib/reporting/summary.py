"""What a report says, in one namespace for the notebooks (``from bloodcell_lib.reporting
import summary as reporting``) and the ``index`` command. Each idea lives in its own module:

* ``records`` -- one record.json per experiment, the reports folder and its file names;
* ``study`` (study.yaml) -- the published reference numbers and the study's targets;
* ``comparison`` -- experiments beside the references; ``targets`` -- met or not;
* ``ablation`` (with ``throughput``, the benchmark's result file) -- which technique bought what;
* ``document`` -- metrics.json; ``index`` -- reports/index.html (templates/index.html.j2).

``bloodcell report [REPORTS_DIR]`` rebuilds metrics.json and index.html from the records.
Building the reports folder is ``bloodcell build`` (run_all.sh, ``bloodcell_lib.build.runner``).
"""
from __future__ import annotations

from bloodcell_lib.reporting.ablation import (ABLATION_FIELDS, TRAINING_PATH_FACTOR, TTA_FACTOR, ablation_frame,
                                              ablation_table, changed_settings)
from bloodcell_lib.reporting.comparison import comparison_table
from bloodcell_lib.reporting.document import load_metrics, metrics_document
from bloodcell_lib.reporting.formatting import format_score
from bloodcell_lib.reporting.index import main, render_index, write_index
from bloodcell_lib.reporting.records import (EXPERIMENT_NOTEBOOKS, FIGURES_DIR, INDEX_FILE, METRICS_FILE,
                                             RECORD_FIELDS, RECORD_FILE, REPORT_NOTEBOOK, build_record,
                                             experiment_dir, figure_dir, init_message, load_records, reports_dir,
                                             split_description, write_record)
from bloodcell_lib.reporting.study import BUILD_TIME_LIMIT_SECONDS, REFERENCES, TARGETS
from bloodcell_lib.reporting.targets import TARGET_FIELDS, targets_frame, targets_summary, targets_table

__all__ = ["ABLATION_FIELDS", "BUILD_TIME_LIMIT_SECONDS", "EXPERIMENT_NOTEBOOKS", "FIGURES_DIR", "INDEX_FILE",
           "METRICS_FILE", "RECORD_FIELDS", "RECORD_FILE", "REFERENCES", "REPORT_NOTEBOOK", "TARGETS",
           "TARGET_FIELDS", "TRAINING_PATH_FACTOR", "TTA_FACTOR", "ablation_frame", "ablation_table",
           "build_record", "changed_settings", "comparison_table", "experiment_dir", "figure_dir",
           "format_score", "init_message", "load_metrics", "load_records", "main", "metrics_document",
           "render_index", "reports_dir", "split_description", "targets_frame", "targets_summary", "targets_table", "write_index",
           "write_record"]

