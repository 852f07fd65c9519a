"""run_all.sh's progress: one line per notebook as it starts, with how far the build is, how long
it has run and about how long it has left, from the seconds the last build recorded
(``build_key.json``) for the notebooks still to run that will not be reused."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence


@dataclass
class Planned:
    """One notebook of the build, in order: whether it is expected to run (not be reused) and
    its seconds when it last ran under this profile (None: never timed)."""

    experiment: str
    notebook: str
    runs: bool
    last_seconds: float | None


def minutes_left(remaining: Sequence[Planned]) -> str:
    """'about 31 min left (from the last build's timings)', or why there is no estimate."""
    to_run = [p for p in remaining if p.runs]
    timed = [p.last_seconds for p in to_run if p.last_seconds is not None]
    if not timed and to_run:
        return "no estimate (no earlier build)"
    untimed = len(to_run) - len(timed)
    minutes = sum(timed) / 60
    amount = "under a minute" if minutes < 1 else f"about {minutes:.0f} min"
    more = f"; {untimed} notebook(s) never timed, not counted" if untimed else ""
    return f"{amount} left (from the last build's timings{more})"


class Progress:
    """Numbers the build's notebooks and writes their progress lines (``line``)."""

    def __init__(self, plan: Sequence[Planned], started: float | None = None):
        self.plan = list(plan)
        self.started = time.time() if started is None else started
        self.index = {(p.experiment, p.notebook): i for i, p in enumerate(self.plan)}

    def line(self, experiment: str, notebook: str, what: str, *, runs: bool) -> str:
        """'7/45 pbc 03_evaluate: started (runs: config); build elapsed 12.3 min, about 31 min left
        (...)'. ``runs``: this notebook's actual decision (the plan's guess for the ones after it)."""
        i = self.index.get((experiment, notebook))
        if i is None:  # not foreseen by the plan
            position, remaining = f"?/{len(self.plan)}", []
        else:
            position = f"{i + 1}/{len(self.plan)}"
            here = self.plan[i]
            remaining = [Planned(here.experiment, here.notebook, runs, here.last_seconds), *self.plan[i + 1:]]
        elapsed = (time.time() - self.started) / 60
        return (f"{position} {experiment} {notebook}: {what}; build elapsed {elapsed:.1f} min, "
                f"{minutes_left(remaining)}")
