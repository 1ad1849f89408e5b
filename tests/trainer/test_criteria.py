"""Streaming criteria agree, at every evaluation, with plain numpy computations over the history."""

from __future__ import annotations

import json
import math
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from personalize.criteria import (
    CRITERIA,
    ClipScoreCriterion,
    DvarCriterion,
    StopPolicy,
    default_threshold,
    make_criterion,
)
from personalize.spec import StopReason

sys.path.insert(0, str(Path(__file__).parent))  # works under any pytest import mode
from criteria_reference import reference_decision, ref_dvar, ref_ema, ref_trend  # noqa: E402


def threshold_of(name: str) -> float:
    """The criterion's own default (0.3 where it defers to the method's DVAR threshold)."""
    return default_threshold(name, 0.3)


def series(kind: str, length: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(length, dtype=float)
    if kind == "converging":  # what a deterministic loss looks like: decay to a plateau + noise
        return 0.1 + 0.5 * np.exp(-t / (length / 5)) + 1e-3 * rng.standard_normal(length)
    if kind == "random_walk":
        return 10.0 + np.cumsum(rng.standard_normal(length))
    if kind == "far_from_zero":  # large offset, tiny variation: cancellation trap for naive sums
        return 1e6 + 1e-3 * rng.standard_normal(length) + 1e-5 * t
    raise ValueError(kind)


def assert_close(got: float | None, want: float | None, what: str) -> None:
    if want is None:
        assert got is None, what
        return
    assert got is not None, what
    assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-12), f"{what}: {got} != {want}"


@pytest.mark.parametrize("name", sorted(CRITERIA))
@pytest.mark.parametrize("kind", ["converging", "random_walk", "far_from_zero"])
@pytest.mark.parametrize("window", [2, 7, 50])
def test_criterion_matches_reference_every_step_and_across_restore(name, kind, window):
    rng = np.random.default_rng(zlib.crc32(f"{name}/{kind}/{window}".encode()))  # the same series in every process
    xs = series(kind, 400, rng)
    threshold = threshold_of(name)
    crit = make_criterion(name, window, threshold)
    restore_at = 173  # mid-series, after the windows have wrapped a few times
    for t, x in enumerate(xs):
        if t == restore_at:
            saved = json.loads(json.dumps(crit.state_dict()))  # must survive a JSON round trip
            crit = make_criterion(name, window, threshold)
            crit.load_state_dict(saved)
        got = crit.update(x)
        want, stops = reference_decision(name, xs[: t + 1], window, threshold)
        assert_close(got, want, f"{name} t={t}")
        assert crit.should_stop() == stops, f"{name} t={t}"
    assert crit.count == len(xs)


def test_trend_per_step_slope_with_eval_every():
    rng = np.random.default_rng(1)
    xs = series("converging", 120, rng)
    crit = make_criterion("trend", 10, 1e-3, eval_every=5)
    for t, x in enumerate(xs):
        assert_close(crit.update(x), ref_trend(xs[: t + 1], 10, eval_every=5), f"t={t}")


def test_ema_custom_alpha():
    rng = np.random.default_rng(2)
    xs = series("random_walk", 100, rng)
    crit = make_criterion("ema", 8, 0.01, alpha=0.5)
    for t, x in enumerate(xs):
        assert_close(crit.update(x), ref_ema(xs[: t + 1], 8, alpha=0.5), f"t={t}")


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_non_finite_values_are_ignored_and_counted(name):
    rng = np.random.default_rng(3)
    xs = series("converging", 200, rng)
    xs[[5, 60, 61, 150]] = [np.nan, np.inf, -np.inf, np.nan]
    crit = make_criterion(name, 12, threshold_of(name))
    finite: list[float] = []
    for t, x in enumerate(xs):
        before = crit.should_stop()
        got = crit.update(x)
        if not np.isfinite(x):
            assert got is None
            assert crit.should_stop() == before  # the decision is not changed by a NaN
            continue
        finite.append(x)
        assert_close(got, reference_decision(name, np.array(finite), 12, threshold_of(name))[0], f"{name} t={t}")
    assert crit.nonfinite == 4
    assert crit.count == 196
    state = json.loads(json.dumps(crit.state_dict()))
    assert state["nonfinite"] == 4
    assert all(math.isfinite(v) for v in state.get("recent", [])), "NaN leaked into the state"


def test_dvar_long_series_stays_accurate():
    """Drift of the sliding update over many windows is bounded by the periodic exact recompute."""
    rng = np.random.default_rng(4)
    xs = 5.0 + rng.standard_normal(20_000) * np.linspace(1.0, 1e-3, 20_000)
    crit = DvarCriterion(window=31, threshold=0.1)
    for x in xs:
        got = crit.update(x)
    assert_close(got, ref_dvar(xs, 31), "after 20000 values")


def test_constant_series_is_converged_not_nan():
    crit = make_criterion("dvar", 3, 0.1)
    for _ in range(5):
        value = crit.update(2.0)
    assert value == 0.0 and crit.should_stop()


def test_clip_patience_matches_reference_and_restores():
    rng = np.random.default_rng(5)
    scores = np.concatenate([np.linspace(0.5, 0.8, 10), 0.8 + 0.004 * rng.standard_normal(30)])
    patience, eps = 3, 0.003

    def ref_stop(prefix):  # recompute the stale-check count from scratch
        best, stale = prefix[0], 0
        for s in prefix[1:]:
            stale = 0 if s - best > eps else stale + 1
            best = max(best, s)
        return stale >= patience

    crit = make_criterion("clip", 99, 99.0, patience=patience, epsilon=eps, every_steps=50)
    assert isinstance(crit, ClipScoreCriterion) and crit.every_steps == 50
    stopped_at = None
    for t, s in enumerate(scores):
        if t == 20:
            saved = json.loads(json.dumps(crit.state_dict()))
            crit = make_criterion("clip", 99, 99.0, patience=patience, epsilon=eps, every_steps=50)
            crit.load_state_dict(saved)
        gain = crit.update(s)
        assert (gain is None) == (t == 0)
        if gain is not None:
            assert math.isclose(gain, s - max(scores[:t]))
        assert crit.should_stop() == ref_stop(scores[: t + 1]), f"t={t}"
        if stopped_at is None and crit.should_stop():
            stopped_at = t
    assert stopped_at is not None and stopped_at >= 10  # never during the rising phase


def test_none_never_stops():
    crit = make_criterion("none", 5, 0.1)
    for _ in range(100):
        assert crit.update(1.0) is None
    assert not crit.should_stop()


def test_make_criterion_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="unknown criterion 'dvarr'"):
        make_criterion("dvarr", 10, 0.1)
    with pytest.raises(ValueError, match="alpha"):
        make_criterion("dvar", 10, 0.1, alpha=0.3)
    with pytest.raises(ValueError, match="window"):
        make_criterion("dvar", 1, 0.1)


def test_state_of_other_criterion_or_window_is_refused():
    dvar = make_criterion("dvar", 10, 0.1)
    with pytest.raises(ValueError):
        make_criterion("hall", 10, 0.1).load_state_dict(dvar.state_dict())
    with pytest.raises(ValueError):
        make_criterion("dvar", 11, 0.1).load_state_dict(dvar.state_dict())


def test_stop_policy_honours_min_and_max_steps():
    crit = make_criterion("dvar", 3, 0.5)
    policy = StopPolicy(crit, max_steps=20, min_steps=8)
    for step, x in enumerate([1.0, 0.5, 0.3, 0.3, 0.3, 0.3], start=1):
        policy.update(x)
        assert policy.check(step) is None  # converged by step 5, but min_steps is 8
    assert crit.should_stop()
    assert policy.check(7) is None
    assert policy.check(8) == StopReason.convergence_threshold
    assert policy.check(20) == StopReason.max_steps  # the budget wins at the last step

    never = StopPolicy(make_criterion("none", 3, 0.1), max_steps=4)
    assert [never.check(s) for s in range(1, 5)] == [None, None, None, StopReason.max_steps]

    # observe(): the loop's one call per step, with the evaluation only on evaluated steps.
    sparse = StopPolicy(make_criterion("dvar", 3, 0.5), max_steps=20, min_steps=0)
    decisions = [sparse.observe(s, x if s % 2 == 0 else None) for s, x in enumerate([1.0, 1.0, 0.5, 0.5, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3], start=1)]
    assert sparse.criterion.count == 5
    assert decisions.index(StopReason.convergence_threshold) + 1 == 8  # 4th evaluation: var(.5,.3,.3)/var(1,.5,.3,.3) = 0.11

    restored = StopPolicy(make_criterion("dvar", 3, 0.5), max_steps=20, min_steps=8)
    restored.load_state_dict(json.loads(json.dumps(policy.state_dict())))
    assert restored.check(8) == StopReason.convergence_threshold
