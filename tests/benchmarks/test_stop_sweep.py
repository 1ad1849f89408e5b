"""benchmarks/stop_sweep.py: DVAR replayed with other windows/thresholds on recorded baselines,
the gain read off the baseline's curve."""

from __future__ import annotations

import json

import pytest
from script_module import load_script

from personalize.criteria import StopPolicy, build_criterion

sweep = load_script("stop_sweep", "stop_sweep_under_test")


def _losses(n=200, knee=50):
    """A loss that falls until `knee`, then wobbles deterministically around a floor."""
    return [0.1 - 0.04 * min(i, knee) / knee + 0.002 * ((i * 7919) % 13 - 6) / 6 for i in range(1, n + 1)]


@pytest.mark.parametrize("window,threshold", [(20, 0.15), (40, 0.3), (60, 0.1)])
def test_every_step_stop_is_the_criterion_fed_one_loss_per_step(window, threshold):
    losses = _losses()
    policy = StopPolicy(build_criterion("dvar", window, 1, threshold), max_steps=10**9)
    expected = next(step for step, loss in enumerate(losses, start=1)
                    if policy.observe(step, loss) is not None)  # the budget is out of reach
    assert sweep.every_step_stop(losses, window, threshold, "lora") == expected
    # a larger window needs at least as many values before it can stop at all
    assert expected >= window


def test_gain_is_interpolated_between_scored_steps():
    steps, gains = [0, 25, 50], [0.0, 0.10, 0.20]
    assert sweep.gain_at(0, steps, gains) == 0.0
    assert sweep.gain_at(10, steps, gains) == pytest.approx(0.04)
    assert sweep.gain_at(40, steps, gains) == pytest.approx(0.16)
    assert sweep.gain_at(60, steps, gains) == 0.20  # past the last point: the final gain


def test_sweep_reads_baselines_and_reports_kept_gain(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    losses = _losses(200)
    curve_steps = list(range(25, 201, 25))
    curve = [0.5 + 0.1 * min(s, 100) / 100 for s in curve_steps]  # gain 0.1 reached at step 100
    for concept, clip in (("red_striped_triangle", curve), ("blue_dotted_star", [0.5] * len(curve))):
        (runs / f"lora_baseline_{concept}.json").write_text(json.dumps({
            "kind": "run", "method": "lora", "variant": "baseline", "concept": concept, "steps": 200, "series": {"eval_steps": list(range(1, 201)), "deterministic_loss": losses,
                                     "curve_steps": curve_steps, "curve_clip_i": clip}}))
        (runs / f"base_{concept}.json").write_text(json.dumps({"clip_i": 0.5}))
    baselines = sweep.load_baselines(runs, "lora", ["red_striped_triangle", "blue_dotted_star", "pink_striped_heart"])
    assert sorted(baselines) == ["blue_dotted_star", "red_striped_triangle"]  # no files: left out
    (row,) = sweep.sweep("lora", baselines, [40], [0.15])
    stop = sweep.every_step_stop(losses, 40, 0.15, "lora")
    # only the concept with a gain counts towards "kept"; both count towards steps
    assert row["kept_per_concept"] == [pytest.approx(min(stop, 100) / 100, abs=1e-3)]
    assert row["median_steps_ratio"] == pytest.approx(stop / 200)
    assert sweep.main(["--runs", str(runs), "--methods", "lora", "--out", str(tmp_path)]) == 0
    assert "| 40 | 0.15 |" in (tmp_path / "stop_sweep_dev.md").read_text()


@pytest.mark.parametrize("outcomes,meets", [
    ([(0.30, 0.95), (0.25, 0.90), (0.20, 1.00)], True),
    ([(0.30, 0.95), (0.25, 0.65), (0.20, 1.00)], False),  # the worst judged concept under 70%
    ([(0.40, 0.95), (0.35, 0.90), (0.30, 1.00)], False),  # median steps over a third
    ([(0.30, 0.85), (0.25, 0.80), (0.20, 1.00)], False),  # the median concept under 90%
    ([(0.30, 0.95), (0.25, None), (0.20, 1.00)], True),  # a concept not judged: steps only
])
def test_summary_checks_the_whole_target(outcomes, meets):
    summary = sweep.summarize(outcomes)
    assert summary["meets_target"] is meets
    judged = [k for _, k in outcomes if k is not None]
    assert summary["min_kept"] == min(judged)
    assert summary["median_steps_ratio"] == sorted(r for r, _ in outcomes)[1]


def test_stop_outcome_runs_the_budget_when_dvar_never_stops():
    baseline = {"budget": 200, "steps": [0, 100, 200], "gains": [0.0, 0.1, 0.2]}
    # a loss that swings as much in the last window as over the run: the ratio stays near 1
    swinging = [0.1 + 0.05 * (-1) ** i for i in range(200)]
    assert sweep.stop_outcome("lora", swinging, 40, 0.15, baseline) == (1.0, 1.0)
    small = {**baseline, "gains": [0.0, 0.01, 0.02]}  # under MIN_JUDGED_GAIN: not judged
    assert sweep.stop_outcome("lora", swinging, 40, 0.15, small) == (1.0, None)
    assert sweep.stop_outcome("lora", _losses(200), 40, 0.15, baseline)[0] < 1.0  # a plateau stops


def test_a_min_steps_floor_delays_the_stop_as_the_training_loop_would():
    losses = _losses()
    free = sweep.every_step_stop(losses, 20, 0.15, "lora")
    policy = StopPolicy(build_criterion("dvar", 20, 1, 0.15), max_steps=10**9, min_steps=free + 30)
    expected = next(step for step, loss in enumerate(losses, start=1) if policy.observe(step, loss) is not None)
    assert sweep.every_step_stop(losses, 20, 0.15, "lora", min_steps=free + 30) == expected >= free + 30
    assert sweep.every_step_stop(losses, 20, 0.15, "lora", min_steps=free - 5) == free  # a floor already passed


def test_the_sweep_covers_each_min_steps_floor(tmp_path):
    losses = _losses(200)
    baseline = {"losses": losses, "budget": 200, "steps": [0, 100, 200], "gains": [0.0, 0.1, 0.1]}
    rows = sweep.sweep("lora", {"a": baseline}, [20], [0.15], min_steps=(0, 150))
    assert [r["min_steps"] for r in rows] == [0, 150]
    assert rows[1]["median_steps_ratio"] >= 150 / 200 > rows[0]["median_steps_ratio"]
