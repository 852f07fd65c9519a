"""Stop signals during training: SIGTERM/SIGINT become KeyboardInterrupt, except while the
end-of-epoch files are being written (``with SIGNALS:``): then the signal waits until they
are complete.

torchrun answers the death of one rank by sending SIGTERM to the others, which may be
exactly when rank 0 writes the checkpoint of an epoch that did finish; deferring keeps that
epoch. (An atomic write that is interrupted anyway leaves the previous file.)
"""
from __future__ import annotations

import contextlib
import signal
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class DeferredSignals:
    def __init__(self) -> None:
        self.critical = 0
        self.pending: int | None = None

    def handler(self, signum, frame):  # noqa: ARG002
        if self.critical:
            self.pending = signum
        else:
            raise KeyboardInterrupt(f"signal {signum}")

    def __enter__(self):
        self.critical += 1
        return self

    def __exit__(self, *exc) -> None:
        self.critical -= 1
        if not self.critical and self.pending is not None:
            signum, self.pending = self.pending, None
            raise KeyboardInterrupt(f"signal {signum} (deferred until the epoch's files were written)")


SIGNALS = DeferredSignals()


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Install SIGNALS.handler for SIGTERM and SIGINT, restoring the previous handlers after."""
    previous = {sig: signal.signal(sig, SIGNALS.handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
