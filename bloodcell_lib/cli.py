"""The ``bloodcell`` command (also ``python -m bloodcell_lib``): one registry of subcommands.

Each subcommand is a module with ``main(argv) -> int`` that parses its own options; adding a
command is one line in ``COMMANDS``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# name -> (module with main(argv), one-line help)
COMMANDS = {
    "audit": ("bloodcell_lib.data.audit", "check a data set: counts, sizes, unreadable files, duplicates"),
    "train": ("bloodcell_lib.training.cli", "train one model from a YAML config (works under torchrun)"),
    "predict": ("bloodcell_lib.evaluation.predict", "classify image files and folders with a checkpoint"),
    "evaluate": ("bloodcell_lib.evaluation.evaluate", "score a run folder on its own test split"),
    "report": ("bloodcell_lib.reporting.summary", "rebuild metrics.json and index.html of a reports folder"),
    "build": ("bloodcell_lib.build.runner", "rebuild the reports folder: every experiment's notebooks (run_all.sh)"),
    "screenshot": ("bloodcell_lib.reporting.browser", "render a local HTML page (the report index) to PNG"),
    "count": ("bloodcell_lib.evaluation.count", "find, classify and count the white cells of smear fields"),
    "suggest": ("bloodcell_lib.evaluation.suggest", "pick the cells of a lab worth labelling; writes a review page"),
    "adapt": ("bloodcell_lib.evaluation.few_shot", "fine-tune a checkpoint on a few labelled cells of one lab"),
    "export": ("bloodcell_lib.evaluation.export", "write a checkpoint's model as ONNX with its preprocessing inside"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bloodcell", description="White-blood-cell classification.",
                                     epilog="'bloodcell COMMAND --help' shows a command's options.")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_) in COMMANDS.items():
        # The command's own module parses the rest, so its --help is its own.
        subcommands.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        command = build_parser().parse_args(argv[:1]).command
    except SystemExit as exit_:  # argparse: 0 for --help, 2 for a missing or unknown command
        return int(exit_.code or 0)
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(module.main(argv[1:]) or 0)
    except SystemExit as exit_:  # a command's argparse: --help or bad options
        return exit_.code if isinstance(exit_.code, int) else 2 if exit_.code else 0
