"""Turn SIGTERM/SIGINT into a flag the training loop polls between steps, so that a preempted run
saves a checkpoint before it exits.

When Kubernetes preempts or deletes a pod it sends SIGTERM and, after the pod's
terminationGracePeriodSeconds (30 s by default), SIGKILL. Python's default SIGTERM action kills
the process on the spot, mid-step; its default SIGINT action raises KeyboardInterrupt wherever
the code happens to be, possibly inside a checkpoint write. Inside `GracefulShutdown` both only
set `.requested`; the loop finishes the current step, saves a checkpoint and exits normally.

A second SIGINT while a shutdown is already pending raises KeyboardInterrupt, so a person at a
terminal can still abort a hanging run. A second SIGTERM is only recorded: the kubelet's
answer to a slow exit is SIGKILL anyway, and a half-written checkpoint is never read (see
`personalize.checkpoint`).

Python only lets the main thread install signal handlers; anywhere else (a notebook worker
thread, a test runner thread) the context manager does nothing but warn, and `.requested`
stays False unless `request()` is called.
"""

from __future__ import annotations

import signal
import threading
import warnings
from types import FrameType
from typing import Any, Optional

__all__ = ["GracefulShutdown", "TrainingInterrupted", "INTERRUPTED_EXIT_CODE"]

# 128 + SIGTERM: what a shell reports for a process killed by SIGTERM. An interrupted run must
# NOT exit 0: the Job controller would count the pod as succeeded and never resume it.
INTERRUPTED_EXIT_CODE = 128 + signal.SIGTERM


class TrainingInterrupted(Exception):
    """Raised by the loop after it saved a checkpoint because a shutdown was requested."""

    def __init__(self, step: int, checkpoint: Optional[str] = None, signal_name: Optional[str] = None):
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name
        where = f"; checkpoint {checkpoint}" if checkpoint else ""
        super().__init__(f"interrupted by {signal_name or 'a shutdown request'} after step {step}{where}")


class GracefulShutdown:
    """Context manager: while active, SIGTERM and SIGINT set `.requested` instead of killing.

        with GracefulShutdown() as shutdown:
            for step in ...:
                train_one_step()
                if shutdown.requested:
                    save_checkpoint(...)
                    break

    `.signal_name` says which signal arrived first ("SIGTERM", "SIGINT", or the reason given to
    `request()`). Previous handlers are restored on exit.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.requested = False
        self.signal_name: Optional[str] = None
        self.count = 0  # signals received
        self.installed = False
        self._previous: dict[signal.Signals, Any] = {}

    def request(self, reason: str = "requested") -> None:
        """Ask for a graceful stop without a signal (e.g. the job was cancelled)."""
        if not self.requested:
            self.signal_name = reason
        self.requested = True

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        # Runs in the main thread between two bytecodes: only set flags here (no I/O, no locks).
        self.count += 1
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.request(signal.Signals(signum).name)

    def __enter__(self) -> "GracefulShutdown":
        if threading.current_thread() is not threading.main_thread():
            warnings.warn(
                "GracefulShutdown: not in the main thread, so signal handlers cannot be installed; "
                "SIGTERM will not trigger a checkpoint",
                RuntimeWarning,
                stacklevel=2,
            )
            return self
        for sig in self.signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)
        self.installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.installed:
            return
        for sig, previous in self._previous.items():
            # getsignal() returns None for a handler installed outside Python: fall back to the default.
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        self.installed = False
