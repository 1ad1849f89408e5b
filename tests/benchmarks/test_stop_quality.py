"""benchmarks/stop_quality.py: s90, the stop verdict and the tracking-cost ratios (pure functions)."""

from __future__ import annotations

import pytest
from script_module import load_script

sq = load_script("stop_quality", "stop_quality_under_test")


def test_s90_is_the_first_step_reaching_ninety_percent_of_the_final_gain():
    steps = [0, 25, 50, 75, 100]
    gains = [0.0, 0.05, 0.089, 0.095, 0.10]
    assert sq.s90(steps, gains) == 75  # 0.089 < 0.9 * 0.10 <= 0.095
    assert sq.s90(steps, [0.0, 0.2, 0.1, 0.1, 0.1]) == 25  # an early overshoot counts: it did reach 90%
    assert sq.s90(steps, [0.0, 0.0, 0.0, 0.0, 0.1]) == 100  # only the end reaches it
    assert sq.s90(steps, gains, min_gain=0.1) is None  # a final gain within the noise floor: no s90
    assert sq.s90(steps, gains, min_gain=0.099) == 75


def test_s90_uses_the_last_value_as_the_final_gain_and_none_without_a_gain():
    assert sq.s90([0, 10, 20], [0.0, 0.5, 0.2]) == 10
    assert sq.s90([0, 10, 20], [0.0, 0.1, 0.0]) is None
    assert sq.s90([0, 10, 20], [0.0, 0.1, -0.05]) is None


@pytest.mark.parametrize("steps, gains", [([], []), ([0, 10], [0.0]), ([0, 10, 10], [0.0, 0.1, 0.1]), ([10, 0], [0.1, 0.0])])
def test_s90_rejects_malformed_curves(steps, gains):
    with pytest.raises(ValueError):
        sq.s90(steps, gains)


@pytest.mark.parametrize(
    "stop, point, verdict",
    [(49, 50, "premature"), (50, 50, "ok"), (100, 50, "ok"), (101, 50, "waste"), (10, None, "n/a")],
)
def test_stop_verdict(stop, point, verdict):
    assert sq.stop_verdict(stop, point) == verdict


def test_stop_quality_counts_and_median_ratio():
    curves = {
        "a": {"steps": [0, 10, 20, 30], "gains": [0.0, 0.1, 0.2, 0.2]},  # s90 20
        "b": {"steps": [0, 10, 20, 30], "gains": [0.0, 0.1, 0.1, 0.1]},  # s90 10
        "c": {"steps": [0, 10, 20, 30], "gains": [0.0, 0.1, 0.0, -0.1]},  # no gain
        "d": {"steps": [0, 10], "gains": [0.0, 0.1]},  # no stop given: left out
    }
    quality = sq.stop_quality(curves, {"a": 15, "b": 25, "c": 30})
    assert quality["per_concept"]["a"] == {"s90": 20, "stop_step": 15, "stop_over_s90": 0.75, "final_gain": 0.2,
                                           "verdict": "premature"}
    assert quality["per_concept"]["b"]["verdict"] == "waste"
    assert quality["per_concept"]["c"]["verdict"] == "n/a"
    assert "d" not in quality["per_concept"]
    assert quality["counts"] == {"premature": 1, "ok": 0, "waste": 1, "n/a": 1}
    assert quality["median_stop_over_s90"] == pytest.approx((0.75 + 2.5) / 2)


def test_steady_seconds_per_step_skips_the_warm_up():
    assert sq.steady_seconds_per_step([9.0, 9.0, 1.0, 2.0, 3.0], skip=2) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        sq.steady_seconds_per_step([1.0, 2.0], skip=2)


def test_tracking_cost_takes_the_ratio_within_each_pair():
    # Pair 2 ran on a loaded machine: both runs slow, the within-pair ratio is unaffected.
    cost = sq.tracking_cost([(0.10, 0.11), (0.30, 0.31), (0.10, 0.12)])
    assert cost["ratio_per_pair"] == pytest.approx([1.1, 31 / 30, 1.2])
    assert cost["median_ratio"] == pytest.approx(1.1)
    assert cost["untracked_s_per_step"] == pytest.approx(0.5 / 3)
    assert cost["pairs"] == 3
    with pytest.raises(ValueError):
        sq.tracking_cost([])


def test_plot_writes_one_picture_per_method(tmp_path):
    curves = {"a": {"steps": [0, 10, 20], "gains": [0.0, 0.2, 0.2]}, "b": {"steps": [0, 10, 20], "gains": [0.0, 0.0, -0.1]}}
    # "c" gains, but less than the judged minimum: no s90, left out of the picture
    curves["c"] = {"steps": [0, 10, 20], "gains": [0.0, 0.01, 0.02]}
    quality = sq.stop_quality(curves, {"a": 5, "b": 20, "c": 10}, min_gain=0.03)
    assert quality["per_concept"]["c"]["s90"] is None and quality["counts"]["n/a"] == 2
    path = sq.plot_stop_quality("lora", curves, quality, tmp_path)
    assert path == tmp_path / "stop_quality_lora.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
