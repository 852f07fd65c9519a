"""Command line: ``python -m bloodcell_lib {audit,train,predict} ...``."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "audit": ("bloodcell_lib.data.audit", "check a data set: counts, sizes, unreadable files, duplicates"),
    "train": ("bloodcell_lib.training.train", "train one model from a YAML config (works under torchrun)"),
    "predict": ("bloodcell_lib.evaluation.predict", "classify image files and folders with a checkpoint"),
    "count": ("bloodcell_lib.evaluation.count", "find, classify and count the white cells of smear fields"),
    "adapt": ("bloodcell_lib.evaluation.few_shot", "fine-tune a checkpoint on a few labelled cells of one lab"),
    "export": ("bloodcell_lib.evaluation.export", "write a checkpoint's model as ONNX with its preprocessing inside"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:8s} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: python -m bloodcell_lib COMMAND [options]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
