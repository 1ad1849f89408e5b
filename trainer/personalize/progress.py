"""The progress of a training run in the log, or as a live bar on a terminal.

    step   120/6100   2.0% | loss 0.1234 | det 0.05678 | dvar 0.412 (stop < 0.15) | ETA 0:03:21

In a pod's log, a CI job or a pipe (stdout not a TTY) a line is printed every `every_steps` steps
or every `every_seconds` seconds, whichever comes first, and always at the first and the last
step: a 6,100-step run leaves a readable `kubectl logs`, not 6,100 lines (reporting.logEverySteps
and logEverySeconds). A last step's line held back until the run ends says `done` where the ETA
was. On a terminal, tqdm draws a live bar with the same numbers beside it.
The ETA is to maxSteps at the mean pace so far: an upper bound, since the criterion may stop
the run earlier.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Callable, Optional, TextIO

from tqdm import tqdm


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
        every_steps: int = 100,
        every_seconds: float = 30.0,
    ):
        self.max_steps = max_steps
        self.threshold = threshold
        self.criterion = criterion
        self.stream = stream if stream is not None else sys.stdout
        self.is_tty = self.stream.isatty() if is_tty is None else is_tty
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self._clock = clock
        self._start: Optional[tuple[int, float]] = None  # (step, time) of the first report
        self._printed: Optional[tuple[int, float]] = None  # (step, time) of the last printed line
        self._pending: Optional[tuple] = None  # the last update's (step, numbers...), when not printed
        self._bar: Optional[tqdm] = None

    def eta_seconds(self, step: int) -> Optional[float]:
        if self._start is None:
            return None
        step0, t0 = self._start
        if step <= step0:
            return None
        per_step = (self._clock() - t0) / (step - step0)
        return per_step * max(self.max_steps - step, 0)

    def _numbers(self, train_loss, deterministic_loss, convergence_value) -> str:
        conv = f"{self.criterion} {_num(convergence_value)}"
        if self.threshold is not None:
            conv += f" (stop < {self.threshold:g})"
        return f"loss {_num(train_loss)} | det {_num(deterministic_loss)} | {conv}"

    def format(
        self,
        step: int,
        train_loss: Optional[float] = None,
        deterministic_loss: Optional[float] = None,
        convergence_value: Optional[float] = None,
        done: bool = False,
    ) -> str:
        width = len(str(self.max_steps))
        percent = 100.0 * step / self.max_steps if self.max_steps else 0.0
        eta = "done" if done else f"ETA {format_duration(self.eta_seconds(step))}"
        return (
            f"step {step:>{width}}/{self.max_steps} {percent:5.1f}% | "
            f"{self._numbers(train_loss, deterministic_loss, convergence_value)} | {eta}"
        )

    def _due(self, step: int, now: float) -> bool:
        if self._printed is None:
            return True
        last_step, last_time = self._printed
        return step - last_step >= self.every_steps or now - last_time >= self.every_seconds

    def update(
        self,
        step: int,
        train_loss: Optional[float] = None,
        deterministic_loss: Optional[float] = None,
        convergence_value: Optional[float] = None,
    ) -> str:
        """Report the progress after `step`; returns the line (printed when due, or drawn as the bar)."""
        now = self._clock()
        if self._start is None:
            # The pace is measured from the first report, so setup time does not inflate the ETA.
            self._start = (step, now)
        line = self.format(step, train_loss, deterministic_loss, convergence_value)
        if self.is_tty:
            if self._bar is None:  # a resumed run's bar starts where the run resumed
                self._bar = tqdm(total=self.max_steps, initial=step - 1, file=self.stream, unit="step",
                                 dynamic_ncols=True, leave=True)
            self._bar.set_postfix_str(self._numbers(train_loss, deterministic_loss, convergence_value), refresh=False)
            self._bar.update(step - self._bar.n)
        elif self._due(step, now):
            self._emit(line)
            self._printed, self._pending = (step, now), None
        else:
            self._pending = (step, train_loss, deterministic_loss, convergence_value)
        return line

    def _emit(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def close(self, message: Optional[str] = None) -> None:
        """Print the last step's line if it was skipped, marked `done` (or end the bar), then an
        optional message."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._pending is not None:
            self._emit(self.format(*self._pending, done=True))
            self._pending = None
        if message:
            self._emit(message)
        self.stream.flush()
