"""benchmarks/tracking_cost.py on recorded series: the adaptive schedule against every step,
without training (what --recorded-only and the knob frontier compute)."""

from __future__ import annotations

import json

from script_module import load_script

tc = load_script("tracking_cost", "tracking_cost_under_test")

WINDOW, THRESHOLD = 20, 0.15


def _losses(n=150):
    """Falls for 40 steps, then wobbles deterministically around a floor."""
    return [0.1 - 0.04 * min(i, 40) / 40 + 0.001 * ((i * 7919) % 11 - 5) / 5 for i in range(1, n + 1)]


def _write(runs, variant, concept, losses, stop_reason="MaxSteps"):
    (runs / f"lora_{variant}_{concept}.json").write_text(json.dumps({
        "kind": "run", "method": "lora", "variant": variant, "concept": concept, "window": WINDOW,
        "threshold": THRESHOLD, "steps": len(losses), "stop_reason": stop_reason,
        "series": {"eval_steps": list(range(1, len(losses) + 1)), "deterministic_loss": losses}}))


def test_the_longest_every_step_series_is_used(tmp_path):
    losses = _losses()
    _write(tmp_path, "baseline", "red_striped_triangle", losses)
    _write(tmp_path, "dvar", "red_striped_triangle", losses[:60], "ConvergenceThreshold")
    _write(tmp_path, "dvar", "blue_dotted_star", losses[:70], "ConvergenceThreshold")
    found = tc.every_step_series(tmp_path)
    assert len(found["lora/red_striped_triangle"]["losses"]) == 150  # the baseline's whole budget
    assert len(found["lora/blue_dotted_star"]["losses"]) == 70


def test_a_gap_of_one_is_evaluating_every_step():
    losses = _losses()
    every = tc.every_step_stop(losses, WINDOW, THRESHOLD, "lora")
    assert every is not None
    one_step = tc.ScheduleKnobs(measurements_per_window=WINDOW)  # largest gap: 1 step
    assert tc.adaptive_stop(losses, WINDOW, THRESHOLD, knobs=one_step) == (every, every)
    stop, evaluations = tc.adaptive_stop(losses, WINDOW, THRESHOLD)
    assert evaluations < (stop or len(losses))  # the defaults skip steps


def test_the_frontier_puts_settings_that_keep_more_stops_first(tmp_path):
    _write(tmp_path, "baseline", "red_striped_triangle", _losses())
    rows = tc.frontier(tc.every_step_series(tmp_path))
    assert len(rows) == len(list(tc.itertools.product(*tc.FRONTIER_GRID.values())))
    keys = [(-r["within_5_steps"], r["mean_evaluated_fraction"]) for r in rows]
    assert keys == sorted(keys)
    assert all(0 < r["mean_evaluated_fraction"] <= 1 for r in rows)


def test_the_fixed_schedule_decides_on_every_kth_value_only(tmp_path):
    losses = _losses()
    every = tc.every_step_stop(losses, WINDOW, THRESHOLD, "lora")
    fifth = tc.every_step_stop(losses, WINDOW, THRESHOLD, "lora", eval_every=5)
    assert fifth % 5 == 0 and fifth != every  # it can only stop where it measured
    # changing a value it never sees changes nothing; changing one it sees can
    hidden = list(losses)
    hidden[fifth - 2] += 1.0  # step fifth - 1: not a multiple of 5
    assert tc.every_step_stop(hidden, WINDOW, THRESHOLD, "lora", eval_every=5) == fifth
    _write(tmp_path, "baseline", "red_striped_triangle", losses)
    series = tc.every_step_series(tmp_path)
    each_step, row = tc.fixed_every(series, (1, 5))
    assert each_step["within_5_steps"] == 1 and each_step["max_distance"] == 0
    assert row["median_distance"] == abs(fifth - every) and row["evaluated_fraction"] == 0.2
    assert row["within_5_steps"] == int(abs(fifth - every) <= 5)
