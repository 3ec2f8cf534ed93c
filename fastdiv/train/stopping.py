"""How a run stops early: the errors :func:`fastdiv.train.train` raises for a non-finite loss and for
SIGINT/SIGTERM, and the signal handler that turns those signals into a flag the loop checks after
every step (so the step in flight finishes and a checkpoint can be written)."""
from __future__ import annotations

import signal

from ..errors import FastdivError

__all__ = ["SignalFlag", "TrainingDiverged", "TrainingInterrupted"]


class TrainingDiverged(FastdivError, RuntimeError):
    """The loss became NaN or Inf; the run stopped and kept its last good checkpoint (exit code 3)."""

    exit_code = 3


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM: the run saved a checkpoint after the current step and stopped.
    ``signum`` is the signal; the CLI exits with ``128 + signum``."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class SignalFlag:
    """SIGINT/SIGTERM set a flag that the loop checks after every step (a second SIGINT raises
    KeyboardInterrupt at once)."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous = {}

    def _handler(self, signum, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> SignalFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: no handlers, the flag stays 0
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

