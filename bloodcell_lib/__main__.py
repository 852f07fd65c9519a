"""``python -m bloodcell_lib COMMAND ...``: the ``bloodcell`` command (bloodcell_lib.cli)."""
import sys

from bloodcell_lib.cli import main

if __name__ == "__main__":
    sys.exit(main())
