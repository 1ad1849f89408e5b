"""When the deterministic loss is evaluated, and which values the criterion sees.

Two schedules (`earlyStopping.evalSchedule`):

- **fixed** (the default): L_det at every step divisible by `evalEvery`; the criterion consumes
  one value per evaluation and its window counts ceil(window / evalEvery) evaluations.
- **adaptive**: evaluate every step while L_det moves unpredictably, rarely while it follows a
  straight line, every step once the convergence value nears the threshold, and at once whenever
  the criterion would stop now if the loss had stayed at its last measurement. The criterion
  consumes one value per *training step*: at each evaluation, the values of the steps since the
  previous evaluation are filled in by linear interpolation between the two measurements, then
  the measurement itself. Its window is therefore the last `window` training steps, as in the
  paper's every-step series; with an evaluation at every step nothing is interpolated and the
  series *is* the paper's. The stop decision is taken at evaluations only (between two of them
  the criterion has nothing new), so a run stops at an evaluated step.

  The gap is error-controlled, like an ODE solver's step: at each evaluation the measurement is
  compared with the straight line through the two before it. That miss is what interpolating
  over such a gap would get wrong, and it is judged against the scale DVAR decides on:
  sqrt(threshold x variance of the whole series), the window's standard deviation when DVAR's
  value is at the threshold. Above TOLERANCE of it the gap halves, below GROW_BELOW x TOLERANCE
  it doubles (up to `max_gap`), in between it stays. Other criteria get the same rule with their
  own threshold; their thresholds are small numbers, so the gaps only get shorter (safe, not cheap).

The recorded `losses.csv` has a value in `deterministic_loss` exactly at the evaluated steps, so
`personalize-train replay --schedule adaptive` rebuilds the same series with `InterpolatedSeries`
(the code the loop uses) and reproduces the live decision.

`gap_for`, `controlled_gap` and `line_miss` are pure functions. Torch-free.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Optional, Union

from personalize.criteria import StopPolicy
from personalize.spec import EarlyStopping, EvalSchedule

# The convergence value's distance from the threshold, as |value| / threshold:
NEAR = 1.5  # at or below: evaluate at every step
FAR = 6.0  # at or above (or undefined): the gap may reach max_gap
# The largest gap, as a fraction of the window: the window always holds a few measurements.
MEASUREMENTS_PER_WINDOW = 4
# Error control: the largest miss of the straight-line prediction that keeps the gap, as a
# fraction of sqrt(threshold x variance of the series); a miss below GROW_BELOW of that doubles it.
# Chosen on the personalization benchmark's recorded every-step series (tracking_cost.py
# --recorded-only): the largest tolerance that keeps 22 of 23 stops within 5 steps.
TOLERANCE = 0.35
GROW_BELOW = 0.25


@dataclass(frozen=True)
class ScheduleKnobs:
    """The adaptive schedule's constants, in one value (the defaults above), so that a study of
    the schedule (benchmarks/tracking_cost.py) can pass others instead of patching this module."""

    near: float = NEAR
    far: float = FAR
    tolerance: float = TOLERANCE
    grow_below: float = GROW_BELOW
    measurements_per_window: int = MEASUREMENTS_PER_WINDOW


def default_max_gap(window_steps: int, measurements_per_window: int = MEASUREMENTS_PER_WINDOW) -> int:
    """The adaptive schedule's largest gap for a criterion window of `window_steps` steps."""
    return max(1, window_steps // measurements_per_window)


def gap_for(value: Optional[float], threshold: float, max_gap: int, near: float = NEAR, far: float = FAR) -> int:
    """The largest gap the convergence value allows.

    Undefined value (the window is not full yet, or a criterion that never stops): `max_gap`.
    |value| / threshold <= NEAR: 1. >= FAR: max_gap. In between, log-linear: the gap shrinks as
    the value approaches the threshold geometrically, which is how DVAR's ratio moves.
    """
    if value is None or not math.isfinite(value) or threshold <= 0:
        return max_gap
    distance = abs(value) / threshold
    if distance <= near:
        return 1
    if distance >= far:
        return max_gap
    fraction = math.log(distance / near) / math.log(far / near)
    return max(1, min(max_gap, 1 + int(fraction * (max_gap - 1))))


def controlled_gap(gap: int, miss: Optional[float], tolerance: float, max_gap: int,
                   grow_below: float = GROW_BELOW) -> int:
    """The next gap from the last one and how far the measurement missed the straight-line
    prediction (None: not enough measurements for a prediction yet, the gap stays)."""
    if miss is None:
        return max(1, min(gap, max_gap))
    if miss > tolerance:
        return max(1, gap // 2)
    if miss < grow_below * tolerance:
        return min(2 * gap, max_gap)
    return min(gap, max_gap)


def line_miss(before: Optional[tuple[int, float]], last: Optional[tuple[int, float]], step: int,
              measured: float) -> Optional[float]:
    """|measured - the straight line through the two previous measurements, at `step`|."""
    if before is None or last is None:
        return None
    (s1, v1), (s2, v2) = before, last
    return abs(measured - (v2 + (v2 - v1) * (step - s2) / (s2 - s1)))


class InterpolatedSeries:
    """Feeds the criterion one value per training step from evaluations at known steps.

    At an evaluation at step e after one at step p, steps p+1 .. e-1 get the linear
    interpolation between the two measurements, then step e its measurement. A non-finite
    measurement is passed to the criterion once (which ignores and counts it) and does not become
    an interpolation end point.
    """

    def __init__(self) -> None:
        self.step = 0  # the last step with a finite measurement (0: none yet)
        self.value: Optional[float] = None
        # Welford's count, mean and sum of squared deviations of the values fed
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def observe(self, policy: StopPolicy, step: int, measured: float) -> Optional[float]:
        """Feed the steps up to `step` (measured there); returns the criterion's last value."""
        if not math.isfinite(measured):
            policy.update(measured)
            return None
        if self.value is not None:
            span = step - self.step
            for k in range(1, span):
                self._feed(policy, self.value + (measured - self.value) * k / span)
        self.step, self.value = step, float(measured)
        return self._feed(policy, measured)

    def _feed(self, policy: StopPolicy, x: float) -> Optional[float]:
        self.count += 1
        delta = x - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (x - self.mean)
        return policy.update(x)

    @property
    def variance(self) -> float:
        """The population variance of every value fed so far (0 before two)."""
        return max(self.m2, 0.0) / self.count if self.count else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "value": self.value, "count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.value = None if state["value"] is None else float(state["value"])
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


class FixedSchedule:
    """Evaluate every `every` steps; the criterion consumes the evaluations only."""

    name = "fixed"

    def __init__(self, every: int):
        self.every = int(every)

    def due(self, step: int, policy: Optional[StopPolicy] = None) -> bool:
        return step % self.every == 0

    def observe(self, step: int, measured: Optional[float], policy: Optional[StopPolicy]) -> Optional[float]:
        """After step `step` (`measured`: its L_det, None if not evaluated): the criterion's new value."""
        if policy is None or measured is None:
            return None
        return policy.update(measured)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class AdaptiveSchedule:
    """Evaluations at error-controlled gaps, capped near the threshold, plus one whenever the
    criterion would stop now on the last measurement held; the criterion consumes the
    interpolated per-step series."""

    name = "adaptive"

    def __init__(self, threshold: float, window_steps: int, max_gap: Optional[int] = None,
                 knobs: ScheduleKnobs = ScheduleKnobs()):
        self.threshold = float(threshold)
        self.knobs = knobs
        self.max_gap = (default_max_gap(window_steps, knobs.measurements_per_window) if max_gap is None
                        else int(max_gap))
        if self.max_gap < 1:
            raise ValueError(f"max_gap must be >= 1, got {self.max_gap}")
        self.series = InterpolatedSeries()
        self.before: Optional[tuple[int, float]] = None  # the measurement before the series' last
        self.gap, self.next_step = 1, 1

    def due(self, step: int, policy: Optional[StopPolicy] = None) -> bool:
        """Whether to evaluate after step `step`; `policy`: the criterion the series feeds (None:
        one that does not read L_det)."""
        return step >= self.next_step or self._would_stop(step, policy)

    def _would_stop(self, step: int, policy: Optional[StopPolicy]) -> bool:
        """Would the criterion stop at `step` if L_det had stayed at its last measurement since?
        Then the measurement decides now, not up to a gap later."""
        last = self.series.value
        if policy is None or last is None or step < policy.min_steps:
            return False
        projected = copy.deepcopy(policy.criterion)
        for _ in range(step - self.series.step):
            projected.update(last)
        return projected.should_stop()

    def observe(self, step: int, measured: Optional[float], policy: Optional[StopPolicy]) -> Optional[float]:
        """After step `step`: feed the criterion when L_det was measured, and plan the next
        evaluation. `policy` None (a criterion that does not read L_det): no stop projection."""
        if measured is None:
            return None
        if not math.isfinite(measured):  # passed to the criterion (which counts it); the plan stays
            if policy is not None:
                self.series.observe(policy, step, measured)
            self.next_step = step + 1
            return None
        last = (self.series.step, self.series.value) if self.series.value is not None else None
        miss = line_miss(self.before, last, step, measured)
        value = self.series.observe(policy if policy is not None else _Discard(), step, measured)
        self.before = last
        knobs = self.knobs
        tolerance = knobs.tolerance * math.sqrt(self.threshold * self.series.variance)
        self.gap = controlled_gap(self.gap, miss, tolerance, self.max_gap, knobs.grow_below)
        current = policy.criterion.value if policy is not None else None
        self.next_step = step + min(self.gap, gap_for(current, self.threshold, self.max_gap, knobs.near, knobs.far))
        return value

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "series": self.series.state_dict(), "before": self.before,
                "gap": self.gap, "next_step": self.next_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"a {state.get('name')!r} schedule's state cannot be loaded into the adaptive schedule")
        self.series.load_state_dict(state["series"])
        before = state["before"]
        self.before = None if before is None else (int(before[0]), float(before[1]))
        self.gap, self.next_step = int(state["gap"]), int(state["next_step"])


class _Discard:
    """A policy stand-in for a criterion that does not read L_det: the series is kept, unused."""

    def update(self, value: float) -> None:
        return None


Schedule = Union[FixedSchedule, AdaptiveSchedule]


def schedule_from_spec(early_stopping: EarlyStopping, threshold: float, window_steps: int) -> Schedule:
    """The schedule of one training stage (a stage has its own window and threshold)."""
    if early_stopping.eval_schedule == EvalSchedule.adaptive:
        return AdaptiveSchedule(threshold, window_steps, early_stopping.max_eval_gap)
    return FixedSchedule(early_stopping.eval_every)
