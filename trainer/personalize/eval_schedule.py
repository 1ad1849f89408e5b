"""When the deterministic loss is evaluated, and which values the criterion sees.

Two schedules (`earlyStopping.evalSchedule`):

- **fixed** (the default): L_det at every step divisible by `evalEvery`; the criterion consumes
  one value per evaluation and its window counts ceil(window / evalEvery) evaluations.
- **adaptive**: evaluate densely at the start (the loss moves fastest there), rarely while the
  convergence value is far from the threshold, and at every step once it is near. The criterion
  consumes one value per *training step*: at each evaluation, the values of the steps since the
  previous evaluation are filled in by linear interpolation between the two measurements, then
  the measurement itself. Its window is therefore the last `window` training steps, as in the
  paper's every-step series; with an evaluation at every step nothing is interpolated and the
  series *is* the paper's. The stop decision is taken at evaluations only (between two of them
  the criterion has nothing new), so a run stops at an evaluated step.

The recorded `losses.csv` has a value in `deterministic_loss` exactly at the evaluated steps, so
`personalize-train replay --schedule adaptive` rebuilds the same series with `InterpolatedSeries`
(the code the loop uses) and reproduces the live decision.

`gap_for` and `next_evaluation` are pure functions. Torch-free.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

from personalize.criteria import StopPolicy
from personalize.spec import EarlyStopping, EvalSchedule

# The convergence value's distance from the threshold, as |value| / threshold:
NEAR = 1.5  # at or below: evaluate at every step
FAR = 6.0  # at or above (or undefined): evaluate every max_gap steps
# The largest gap, as a fraction of the window: the window always holds about this many
# measurements, so its variance is estimated from several of them.
MEASUREMENTS_PER_WINDOW = 10
# The first steps are evaluated one by one: there the loss moves fastest, and when they leave the
# criterion's window (one window later) its value usually drops steeply.
DENSE_START_FRACTION = 30  # the first window // 30 steps


def default_max_gap(window_steps: int) -> int:
    """The adaptive schedule's largest gap for a criterion window of `window_steps` steps."""
    return max(1, window_steps // MEASUREMENTS_PER_WINDOW)


def dense_start(window_steps: int) -> int:
    """How many first steps the adaptive schedule evaluates one by one."""
    return max(1, window_steps // DENSE_START_FRACTION)


def gap_for(value: Optional[float], threshold: float, max_gap: int) -> int:
    """How many steps the next evaluation may wait, given the convergence value.

    Undefined value (the window is not full yet, or a criterion that never stops): `max_gap`.
    |value| / threshold <= NEAR: 1. >= FAR: max_gap. In between, log-linear: the gap shrinks as
    the value approaches the threshold geometrically, which is how DVAR's ratio moves.
    """
    if value is None or not math.isfinite(value) or threshold <= 0:
        return max_gap
    distance = abs(value) / threshold
    if distance <= NEAR:
        return 1
    if distance >= FAR:
        return max_gap
    fraction = math.log(distance / NEAR) / math.log(FAR / NEAR)
    return max(1, min(max_gap, 1 + int(fraction * (max_gap - 1))))


def next_evaluation(
    last_step: int, last_gap: int, value: Optional[float], threshold: float, max_gap: int, dense_until: int
) -> int:
    """The step of the evaluation after the one at `last_step`, which came `last_gap` steps after
    its predecessor. Every step up to `dense_until`; then the gap at most doubles from one
    evaluation to the next, and drops to `gap_for(value)` at once when the value nears the
    threshold."""
    if last_step < dense_until:
        return last_step + 1
    return last_step + min(2 * max(1, last_gap), gap_for(value, threshold, max_gap))


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

    def observe(self, policy: StopPolicy, step: int, measured: float) -> Optional[float]:
        """Feed the steps up to `step` (measured there); returns the criterion's last value."""
        if not math.isfinite(measured):
            policy.update(measured)
            return None
        if self.value is not None:
            span = step - self.step
            for k in range(1, span):
                policy.update(self.value + (measured - self.value) * k / span)
        self.step, self.value = step, float(measured)
        return policy.update(measured)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.value = None if state["value"] is None else float(state["value"])


class FixedSchedule:
    """Evaluate every `every` steps; the criterion consumes the evaluations only."""

    name = "fixed"

    def __init__(self, every: int):
        self.every = int(every)

    def due(self, step: int) -> bool:
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
    """Evaluations at steps chosen by `next_evaluation` from the criterion's value; the criterion
    consumes the interpolated per-step series."""

    name = "adaptive"

    def __init__(self, threshold: float, window_steps: int, max_gap: Optional[int] = None):
        self.threshold = float(threshold)
        self.max_gap = default_max_gap(window_steps) if max_gap is None else int(max_gap)
        if self.max_gap < 1:
            raise ValueError(f"max_gap must be >= 1, got {self.max_gap}")
        self.dense_until = dense_start(window_steps)
        self.series = InterpolatedSeries()
        self.last_step, self.last_gap, self.next_step = 0, 1, 1

    def due(self, step: int) -> bool:
        return step >= self.next_step

    def observe(self, step: int, measured: Optional[float], policy: Optional[StopPolicy]) -> Optional[float]:
        """After step `step`: feed the criterion when L_det was measured, and plan the next
        evaluation. `policy` None (a criterion that does not read L_det): gaps grow to max_gap."""
        if measured is None:
            return None
        value = self.series.observe(policy, step, measured) if policy is not None else None
        self.last_gap, self.last_step = step - self.last_step, step
        current = policy.criterion.value if policy is not None else None
        self.next_step = next_evaluation(step, self.last_gap, current, self.threshold, self.max_gap, self.dense_until)
        return value

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "series": self.series.state_dict(), "last_step": self.last_step,
                "last_gap": self.last_gap, "next_step": self.next_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"a {state.get('name')!r} schedule's state cannot be loaded into the adaptive schedule")
        self.series.load_state_dict(state["series"])
        self.last_step, self.last_gap, self.next_step = int(state["last_step"]), int(state["last_gap"]), int(state["next_step"])


Schedule = Union[FixedSchedule, AdaptiveSchedule]


def schedule_from_spec(early_stopping: EarlyStopping, threshold: float, window_steps: int) -> Schedule:
    """The schedule of one training stage (a stage has its own window and threshold)."""
    if early_stopping.eval_schedule == EvalSchedule.adaptive:
        return AdaptiveSchedule(threshold, window_steps, early_stopping.max_eval_gap)
    return FixedSchedule(early_stopping.eval_every)
