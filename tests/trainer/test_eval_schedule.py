"""The evaluation schedule: its pure decisions, the interpolated series, and that replay names the
step the loop stopped at."""

from __future__ import annotations

import json
import math
import random
from argparse import Namespace

import pytest

from personalize import eval_schedule
from personalize.criteria import CRITERIA, StopPolicy, build_criterion, default_threshold
from personalize.eval_schedule import (
    AdaptiveSchedule,
    FixedSchedule,
    InterpolatedSeries,
    ScheduleKnobs,
    controlled_gap,
    default_max_gap,
    gap_for,
    line_miss,
    schedule_from_spec,
)
from personalize.replay import REPLAYABLE
from personalize.replay import run as replay_run
from personalize.spec import EarlyStopping, EvalSchedule

# ---- pure decisions ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, math.nan, math.inf])
def test_an_undefined_value_allows_the_largest_gap(value):
    assert gap_for(value, 0.15, max_gap=31) == 31


def test_near_the_threshold_every_step_is_evaluated():
    threshold = 0.2
    for distance in (0.1, 0.99, 1.0, eval_schedule.NEAR):
        assert gap_for(distance * threshold, threshold, max_gap=31) == 1
    assert gap_for(-1.2 * threshold, threshold, max_gap=31) == 1  # the magnitude counts (trend, ema)


def test_far_from_the_threshold_the_gap_is_the_largest():
    assert gap_for(eval_schedule.FAR * 0.15, 0.15, max_gap=31) == 31
    assert gap_for(1e9, 0.15, max_gap=31) == 31


def test_the_gap_grows_with_the_distance_and_stays_in_bounds():
    distances = [eval_schedule.NEAR + k * (eval_schedule.FAR - eval_schedule.NEAR) / 40 for k in range(41)]
    gaps = [gap_for(d * 0.15, 0.15, max_gap=31) for d in distances]
    assert gaps == sorted(gaps) and gaps[0] == 1 and gaps[-1] == 31
    assert len(set(gaps)) > 5  # it is graded, not a switch


def test_the_gap_halves_on_a_miss_doubles_on_a_hit_and_stays_in_between():
    tolerance = 1.0
    assert controlled_gap(8, 1.01, tolerance, max_gap=31) == 4
    assert controlled_gap(1, 5.0, tolerance, max_gap=31) == 1
    assert controlled_gap(8, eval_schedule.GROW_BELOW * 0.99, tolerance, max_gap=31) == 16
    assert controlled_gap(20, 0.0, tolerance, max_gap=31) == 31  # capped
    assert controlled_gap(8, 0.5, tolerance, max_gap=31) == 8
    assert controlled_gap(8, None, tolerance, max_gap=31) == 8  # no prediction yet


def test_the_miss_is_measured_against_the_line_through_the_two_previous_measurements():
    assert line_miss((1, 1.0), (3, 3.0), 7, 7.0) == 0.0
    assert line_miss((1, 1.0), (3, 3.0), 7, 6.5) == 0.5
    assert line_miss(None, (3, 3.0), 7, 6.5) is None


def test_defaults_scale_with_the_window():
    assert default_max_gap(310) == 77 and default_max_gap(60) == 15 and default_max_gap(3) == 1


def evaluated_steps(values, window, threshold, knobs=ScheduleKnobs()):
    schedule = AdaptiveSchedule(threshold, window, knobs=knobs)
    policy = StopPolicy(build_criterion("dvar", window, 1, threshold), max_steps=10_000)
    evaluated = []
    for step, value in enumerate(values, 1):
        if schedule.due(step, policy):
            schedule.observe(step, value, policy)
            evaluated.append(step)
    return evaluated


def test_a_straight_line_is_evaluated_ever_more_rarely_and_a_zigzag_at_every_step():
    line = evaluated_steps([1.0 - 0.001 * i for i in range(200)], 60, 0.15)
    gaps = [b - a for a, b in zip(line, line[1:])]
    assert gaps[:4] == [1, 1, 2, 4] and max(gaps) == default_max_gap(60)
    zigzag = evaluated_steps([1.0 + 0.01 * (-1) ** i - 0.001 * i for i in range(200)], 60, 0.15)
    assert zigzag == list(range(1, 201))


def test_other_knobs_change_the_schedule_without_touching_the_defaults():
    line = [1.0 - 0.001 * i for i in range(200)]
    wide = evaluated_steps(line, 60, 0.15, ScheduleKnobs(measurements_per_window=2))
    assert max(b - a for a, b in zip(wide, wide[1:])) == 30  # window / 2
    zigzag = [1.0 + 0.01 * (-1) ** i - 0.001 * i for i in range(200)]
    lax = evaluated_steps(zigzag, 60, 0.15, ScheduleKnobs(tolerance=float("inf")))
    assert len(lax) < 150  # no error control: the zigzag no longer forces every step (default: all 200)
    assert ScheduleKnobs() == ScheduleKnobs(eval_schedule.NEAR, eval_schedule.FAR, eval_schedule.TOLERANCE,
                                            eval_schedule.GROW_BELOW, eval_schedule.MEASUREMENTS_PER_WINDOW)
    assert evaluated_steps(zigzag, 60, 0.15) == list(range(1, 201))


def test_an_evaluation_is_called_when_the_held_measurement_would_stop_the_run():
    """Between planned evaluations, the schedule asks whether the criterion would stop at this
    step had L_det stayed at its last measurement; from the first step where it would, it is due."""
    window, threshold = 20, 0.15
    values = [10.0 - i for i in range(10)] + [1.0] * 5
    schedule = AdaptiveSchedule(threshold, window)
    policy = StopPolicy(build_criterion("dvar", window, 1, threshold), max_steps=10_000)
    for step, value in enumerate(values, 1):
        schedule.observe(step, value, policy)  # measured at every step up to 15
    schedule.next_step = 10_000  # no planned evaluation
    held = StopPolicy(build_criterion("dvar", window, 1, threshold), max_steps=10_000)
    for value in values:
        held.update(value)
    first = next(step for step in range(16, 200) if held.update(1.0) is not None and held.criterion.should_stop())
    assert [schedule.due(step, policy) for step in range(16, first + 1)] == [False] * (first - 16) + [True]
    assert not schedule.due(first, None)  # no criterion to project: only the plan counts
    policy.min_steps = first + 1
    assert not schedule.due(first, policy)  # no stop is allowed yet


def test_the_spec_chooses_the_schedule():
    assert isinstance(schedule_from_spec(EarlyStopping(), 0.15, 310), FixedSchedule)
    adaptive = schedule_from_spec(EarlyStopping(eval_schedule="adaptive"), 0.15, 310)
    assert isinstance(adaptive, AdaptiveSchedule) and adaptive.max_gap == 77
    assert schedule_from_spec(EarlyStopping(eval_schedule="adaptive", max_eval_gap=7), 0.15, 310).max_gap == 7
    assert EarlyStopping(eval_schedule="adaptive", eval_every=5).criterion_spacing == 1
    assert EarlyStopping(eval_every=5).criterion_spacing == 5


# ---- the series the criterion sees -----------------------------------------------------------------


class Recorder:
    """A stand-in policy that records what the criterion is fed."""

    def __init__(self):
        self.fed: list[float] = []
        self.criterion = Namespace(value=None)

    def update(self, value):
        self.fed.append(value)
        return None


def test_interpolation_fills_the_steps_between_evaluations():
    series, policy = InterpolatedSeries(), Recorder()
    series.observe(policy, 1, 10.0)
    series.observe(policy, 5, 2.0)
    series.observe(policy, 6, 3.0)
    assert policy.fed == [10.0, 8.0, 6.0, 4.0, 2.0, 3.0]  # one value per training step


def test_a_non_finite_measurement_is_passed_once_and_not_interpolated_from():
    series, policy = InterpolatedSeries(), Recorder()
    series.observe(policy, 1, 1.0)
    series.observe(policy, 2, math.nan)
    series.observe(policy, 3, 3.0)
    assert policy.fed[:1] == [1.0] and math.isnan(policy.fed[1]) and policy.fed[2:] == [2.0, 3.0]


def test_with_an_evaluation_at_every_step_the_series_is_the_measured_one():
    values = [1.0 / (1 + i) for i in range(50)]
    direct = StopPolicy(build_criterion("dvar", 10, 1, 0.15), max_steps=1000)
    interpolated = StopPolicy(build_criterion("dvar", 10, 1, 0.15), max_steps=1000)
    series = InterpolatedSeries()
    for step, v in enumerate(values, start=1):
        assert series.observe(interpolated, step, v) == direct.update(v)


# ---- live (the loop's logic) against replay ---------------------------------------------------------


def decaying_series(n: int, seed: int) -> list[float]:
    """A loss that decays to a plateau with smooth wiggles and a little noise."""
    rng = random.Random(seed)
    return [0.2 + math.exp(-i / 15) + 0.01 * math.sin(i / 3) + 1e-3 * rng.random() for i in range(1, n + 1)]


def live_run(values, schedule, policy):
    """What train_stage does after each step: evaluate when due, feed the criterion, check."""
    evaluated = {}
    for step, value in enumerate(values, start=1):
        measured = value if schedule.due(step, policy) else None
        if measured is not None:
            evaluated[step] = measured
        schedule.observe(step, measured, policy)
        if policy.check(step) is not None:
            return step, evaluated
    return None, evaluated


def write_losses(path, evaluated: dict[int, float], last_step: int) -> None:
    lines = ["step,train_loss,deterministic_loss,convergence_value"]
    lines += [f"{s},0.5,{evaluated[s]!r}," if s in evaluated else f"{s},0.5,," for s in range(1, last_step + 1)]
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", REPLAYABLE)
def test_replay_reproduces_the_adaptive_runs_stop(name, seed, tmp_path):
    window, min_steps = 40, 10
    threshold = default_threshold(name, 0.2)
    values = decaying_series(400, seed)
    schedule = AdaptiveSchedule(threshold, window)
    policy = StopPolicy(build_criterion(name, window, 1, threshold), max_steps=10_000, min_steps=min_steps)
    stop, evaluated = live_run(values, schedule, policy)
    last_step = stop if stop is not None else len(values)
    assert len(evaluated) < last_step  # the schedule did skip steps
    write_losses(tmp_path / "losses.csv", evaluated, last_step)
    args = Namespace(file=str(tmp_path / "losses.csv"), criterion=name, window=window, threshold=threshold,
                     eval_every=None, min_steps=min_steps, method="lora", schedule=None)
    (result,) = replay_run(args)
    assert result["schedule"] == "adaptive"  # recognised from the uneven gaps
    assert result["stop_step"] == stop
    if CRITERIA[name].stops_early:
        assert stop is not None  # the series converges: the comparison is not vacuous


def test_a_resumed_schedule_continues_exactly(tmp_path):
    values = decaying_series(300, 3)
    whole = AdaptiveSchedule(0.15, 40)
    whole_policy = StopPolicy(build_criterion("dvar", 40, 1, 0.15), max_steps=10_000)
    first = AdaptiveSchedule(0.15, 40)
    first_policy = StopPolicy(build_criterion("dvar", 40, 1, 0.15), max_steps=10_000)
    stop_whole, evaluated_whole = live_run(values, whole, whole_policy)
    assert stop_whole is not None and stop_whole > 30
    cut = stop_whole - 15  # checkpointed after step `cut`, inside the sparse stretch
    _, evaluated_first = live_run(values[:cut], first, first_policy)
    resumed = AdaptiveSchedule(0.15, 40)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    resumed_policy = StopPolicy(build_criterion("dvar", 40, 1, 0.15), max_steps=10_000)
    resumed_policy.load_state_dict(json.loads(json.dumps(first_policy.state_dict())))
    evaluated_rest = {}
    stop_resumed = None
    for step in range(cut + 1, len(values) + 1):
        measured = values[step - 1] if resumed.due(step, resumed_policy) else None
        if measured is not None:
            evaluated_rest[step] = measured
        resumed.observe(step, measured, resumed_policy)
        if resumed_policy.check(step) is not None:
            stop_resumed = step
            break
    assert evaluated_first | evaluated_rest == evaluated_whole and stop_resumed == stop_whole


def test_replay_refuses_eval_every_on_an_adaptive_series(tmp_path):
    write_losses(tmp_path / "losses.csv", {1: 1.0, 2: 0.9, 4: 0.8, 8: 0.7}, 8)
    args = Namespace(file=str(tmp_path / "losses.csv"), criterion="dvar", window=4, threshold=0.1,
                     eval_every=2, min_steps=0, method="lora", schedule=None)
    from personalize.replay import ReplayError

    with pytest.raises(ReplayError, match="cannot be combined"):
        replay_run(args)


def test_an_even_series_replays_as_fixed_unless_told(tmp_path):
    write_losses(tmp_path / "losses.csv", {s: 1.0 / s for s in range(2, 41, 2)}, 40)
    args = Namespace(file=str(tmp_path / "losses.csv"), criterion="dvar", window=8, threshold=0.1,
                     eval_every=None, min_steps=0, method="lora", schedule=None)
    (fixed,) = replay_run(args)
    (adaptive,) = replay_run(Namespace(**{**vars(args), "schedule": EvalSchedule.adaptive.value}))
    assert (fixed["schedule"], fixed["window_evaluations"]) == ("fixed", 4)
    assert (adaptive["schedule"], adaptive["window_evaluations"]) == ("adaptive", 8)
