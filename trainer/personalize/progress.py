"""The terminal progress line of a training run.

    step   120/6100   2.0% | loss 0.1234 | det 0.05678 | dvar 0.412 (stop < 0.15) | ETA 0:03:21

On a terminal the line is rewritten in place (carriage return); in a pod's log, a CI job or a
pipe (stdout not a TTY) every report is its own line, so logs stay readable and greppable.
The ETA is to maxSteps at the mean pace so far: an upper bound, since the criterion may stop
the run earlier.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Callable, Optional, TextIO


def format_duration(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(seconds, 0.0)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _num(value: Optional[float]) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"


def tracking_cost(tracking_seconds: float, seconds: float) -> str:
    """The closing line's note on what tracking cost: 'evaluating the stop signal took 1.6 s of 5.9 s (27%)'."""
    share = tracking_seconds / seconds if seconds > 0 else 0.0
    return f"evaluating the stop signal took {tracking_seconds:.1f} s of {seconds:.1f} s ({share:.0%})"


class ProgressPrinter:
    def __init__(
        self,
        max_steps: int,
        threshold: Optional[float] = None,
        criterion: str = "conv",
        stream: Optional[TextIO] = None,
        is_tty: Optional[bool] = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_steps = max_steps
        self.threshold = threshold
        self.criterion = criterion
        self.stream = stream if stream is not None else sys.stdout
        self.is_tty = self.stream.isatty() if is_tty is None else is_tty
        self._clock = clock
        self._start: Optional[tuple[int, float]] = None  # (step, time) of the first report
        self._last_len = 0

    def eta_seconds(self, step: int) -> Optional[float]:
        if self._start is None:
            return None
        step0, t0 = self._start
        if step <= step0:
            return None
        per_step = (self._clock() - t0) / (step - step0)
        return per_step * max(self.max_steps - step, 0)

    def format(
        self,
        step: int,
        train_loss: Optional[float] = None,
        deterministic_loss: Optional[float] = None,
        convergence_value: Optional[float] = None,
    ) -> str:
        width = len(str(self.max_steps))
        percent = 100.0 * step / self.max_steps if self.max_steps else 0.0
        conv = f"{self.criterion} {_num(convergence_value)}"
        if self.threshold is not None:
            conv += f" (stop < {self.threshold:g})"
        return (
            f"step {step:>{width}}/{self.max_steps} {percent:5.1f}% | loss {_num(train_loss)} | "
            f"det {_num(deterministic_loss)} | {conv} | ETA {format_duration(self.eta_seconds(step))}"
        )

    def update(
        self,
        step: int,
        train_loss: Optional[float] = None,
        deterministic_loss: Optional[float] = None,
        convergence_value: Optional[float] = None,
    ) -> str:
        """Print the progress after `step`; returns the line (without control characters)."""
        if self._start is None:
            # The pace is measured from the first report, so setup time does not inflate the ETA.
            self._start = (step, self._clock())
        line = self.format(step, train_loss, deterministic_loss, convergence_value)
        if self.is_tty:
            pad = " " * max(self._last_len - len(line), 0)  # erase leftovers of a longer line
            self.stream.write("\r" + line + pad)
            self._last_len = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        return line

    def close(self, message: Optional[str] = None) -> None:
        """End the in-place line (TTY) and print an optional closing message."""
        if self.is_tty and self._last_len:
            self.stream.write("\n")
            self._last_len = 0
        if message:
            self.stream.write(message + "\n")
        self.stream.flush()
