"""The run's console output: printed by rank 0 only, so torchrun's N processes log one run."""
from __future__ import annotations

from typing import Any

from bloodcell_lib.core import distributed as D


def log(*args: Any) -> None:
    """print() on rank 0 only, flushed so notebook and torchrun logs interleave correctly."""
    if D.is_main():
        print(*args, flush=True)
