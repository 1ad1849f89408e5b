"""benchmarks/packing_economics.py: recorded steps per concept times measured seconds per step,
for solo and packed runs, with the cheapest stop setting that meets the per-concept floor."""

from __future__ import annotations

import json
import statistics

import pytest
from script_module import load_script

economics = load_script("packing_economics", "packing_economics_under_test")
from recorded_runs import every_step_stop  # noqa: E402  (on the path once a benchmark script is loaded)

CONCEPTS = ["red_striped_triangle", "blue_dotted_star"]  # dev concepts
WINDOW, THRESHOLD, BUDGET = 20, 0.15, 200
SOLO_RATE, PACK_RATE, SHARE = 10.0, 40.0, 0.5  # concept-steps/s at 8 slots; evaluation / training step
DVAR_STEPS = {"red_striped_triangle": 60, "blue_dotted_star": 90}
BASE_SECONDS = 18.0  # one base evaluation: 6 images x 3 templates x 25 denoising steps


def _losses(knee):
    """L_det falls until `knee`, then wobbles around a floor: DVAR stops soon after the knee."""
    return [0.1 - 0.04 * min(i, knee) / knee + 0.002 * ((i * 7919) % 13 - 6) / 6 for i in range(1, BUDGET + 1)]


def _sweep_row(min_steps, min_kept):
    return {"window": WINDOW, "threshold": THRESHOLD, "min_steps": min_steps, "min_kept": min_kept, "median_kept": 0.95}


def _inputs(tmp_path, sweep_rows, guard_rows):
    runs = tmp_path / "runs"
    runs.mkdir()
    for knee, concept in zip((30, 50), CONCEPTS):
        (runs / f"lora_baseline_{concept}.json").write_text(json.dumps({
            "kind": "run", "method": "lora", "variant": "baseline", "concept": concept, "steps": BUDGET,
            "window": WINDOW, "threshold": THRESHOLD,
            "series": {"eval_steps": list(range(1, BUDGET + 1)), "deterministic_loss": _losses(knee),
                       "curve_steps": list(range(25, BUDGET + 1, 25)),
                       "curve_clip_i": [0.5 + g for g in (0.02, 0.05, 0.08, 0.1, 0.1, 0.1, 0.1, 0.1)]}}))
        (runs / f"base_{concept}.json").write_text(json.dumps({
            "clip_i": 0.5, "seconds": BASE_SECONDS, "eval_images_per_prompt": 6, "eval_inference_steps": 25,
            "clip_num_samples": 8, "clip_inference_steps": 25}))
    files = {
        "packing": {"command": "python benchmarks/packing.py", "device": "cpu, 1 thread", "stepsPerConcept": 20, "rows": [
            {"method": "lora", "slots": 1, "soloConceptStepsPerSecond": 1.0, "packConceptStepsPerSecond": 1.0},
            {"method": "lora", "slots": 8, "soloConceptStepsPerSecond": SOLO_RATE, "packConceptStepsPerSecond": PACK_RATE}]},
        "step-timing": {"step_timing": {"lora": {"eval_seconds_over_train_step_seconds": SHARE,
                                                 "median_step_seconds": {"no_tracking": 0.05}}}},
        "personalization": {"settings": {"lora": {"max_steps": BUDGET, "window": WINDOW, "threshold": THRESHOLD}},
                            "table": {"lora": {"dvar": {"per_concept": {c: {"steps": s} for c, s in DVAR_STEPS.items()}}}},
                            "evaluation": {"templates": ["a", "b", "c"]}},
        "sweep": {"lora": {"rows": sweep_rows}},
        "guard": {"lora": {"rows": guard_rows}},
    }
    argv = ["--runs", str(runs), "--methods", "lora", "--out", str(tmp_path / "out")]
    for name, content in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
        argv += [f"--{name}", str(tmp_path / f"{name}.json")]
    return argv


def _report(tmp_path, sweep_rows, guard_rows=()):
    assert economics.main(_inputs(tmp_path, sweep_rows, list(guard_rows))) == 0
    report = json.loads((tmp_path / "out" / "packing_economics.json").read_text())
    return report["methods"]["lora"], (tmp_path / "out" / "packing_economics.md").read_text()


def _replayed(runs, min_steps):
    """The studies' replay (recorded_runs.every_step_stop) of the fixture's DVAR with a minSteps floor."""
    series = [json.loads(p.read_text())["series"]["deterministic_loss"] for p in sorted(runs.glob("lora_baseline_*.json"))]
    return [every_step_stop(losses, WINDOW, THRESHOLD, "lora", min_steps) or BUDGET for losses in series]


def test_solo_and_packed_costs_are_recorded_steps_times_the_eight_slot_rates(tmp_path):
    result, _ = _report(tmp_path, [_sweep_row(0, 0.8)])
    a, b, c = (case["cpu_seconds_per_concept"] for case in result["cases"][:3])
    mean_dvar = statistics.mean(DVAR_STEPS.values())
    assert a == pytest.approx(BUDGET / SOLO_RATE)  # the fixed budget is not tracked
    assert b == pytest.approx(mean_dvar / SOLO_RATE * (1 + SHARE))
    assert c == pytest.approx(mean_dvar / PACK_RATE * (1 + SHARE))
    assert result["tracking_unpacked"]["c"] == pytest.approx(mean_dvar * (1 / PACK_RATE + SHARE / SOLO_RATE))


def test_time_outside_training_steps_is_paid_once_per_concept_when_the_row_splits_it_off(tmp_path):
    argv = _inputs(tmp_path, [_sweep_row(0, 0.8)], [])
    packing = json.loads((tmp_path / "packing.json").read_text())
    packing["rows"][1].update(conceptSteps=480, soloSeconds=100.0, soloTrainingSeconds=36.0,
                              packSeconds=30.0, packTrainingSeconds=14.0)
    (tmp_path / "packing.json").write_text(json.dumps(packing))
    assert economics.main(argv) == 0
    a, b, c = json.loads((tmp_path / "out" / "packing_economics.json").read_text())["methods"]["lora"]["cases"][:3]
    mean_dvar = statistics.mean(DVAR_STEPS.values())
    solo_step, pack_step = 36.0 / 480, 14.0 / 480
    assert a["cpu_seconds_per_concept"] == pytest.approx((100 - 36) / 8 + BUDGET * solo_step)
    assert b["cpu_seconds_per_concept"] == pytest.approx((100 - 36) / 8 + mean_dvar * solo_step * (1 + SHARE))
    assert c["cpu_seconds_per_concept"] == pytest.approx((30 - 14) / 8 + mean_dvar * pack_step * (1 + SHARE))


def test_d_is_the_cheapest_recorded_setting_whose_worst_concept_meets_the_floor(tmp_path):
    too_weak, patient, more_patient = _sweep_row(0, 0.5), _sweep_row(100, 0.75), _sweep_row(150, 0.9)
    result, md = _report(tmp_path, [more_patient, too_weak, patient])
    stops = _replayed(tmp_path / "runs", 100)
    assert min(stops) >= 100 and _replayed(tmp_path / "runs", 0) != stops  # the floor changes the stops it is priced on
    d = result["cases"][3]
    assert result["floor"]["setting"] == f"DVAR window {WINDOW}, threshold {THRESHOLD}, minSteps 100"
    assert result["floor_settings_found"] == 2
    assert d["mean_steps"] == pytest.approx(statistics.mean(stops))
    assert d["cpu_seconds_per_concept"] == pytest.approx(statistics.mean(stops) / PACK_RATE * (1 + SHARE))
    b = result["cases"][1]["cpu_seconds_per_concept"]
    assert result["d_at_most_b"] == (d["cpu_seconds_per_concept"] <= b)
    assert f"**(d) <= (b)? {'yes' if result['d_at_most_b'] else 'no'}**" in md


def test_a_guard_pick_pays_for_its_clip_checks(tmp_path):
    result, md = _report(tmp_path, [_sweep_row(0, 0.5)], [{"patience": 2, "min_kept": 0.8, "median_kept": 0.9}])
    d = result["cases"][3]
    check_seconds = BASE_SECONDS * 8 / 18  # 8 samples against the base evaluation's 18 images, 25 steps each
    assert d["clip_checks_per_concept"] > 0
    assert d["clip_check_seconds_per_concept"] == pytest.approx(d["clip_checks_per_concept"] * check_seconds)
    assert d["cpu_seconds_per_concept"] == pytest.approx(
        d["mean_steps"] / PACK_RATE * (1 + SHARE) + d["clip_checks_per_concept"] * check_seconds)
    assert "CLIP guard checks:" in md and "upper bound" in md


def test_a_method_without_a_setting_that_meets_the_floor_says_so(tmp_path):
    result, md = _report(tmp_path, [_sweep_row(0, 0.5), _sweep_row(100, 0.69)], [{"patience": 3, "min_kept": 0.2, "median_kept": 0.9}])
    assert result["floor"] is None and result["d_at_most_b"] is None and len(result["cases"]) == 3
    assert "Not answerable" in md


def test_the_report_says_it_is_a_model_and_names_every_input(tmp_path):
    argv = _inputs(tmp_path, [_sweep_row(0, 0.8)], [])
    assert economics.main(argv) == 0
    md = (tmp_path / "out" / "packing_economics.md").read_text()
    assert "A model, not a run" in md
    for name in ("packing", "step-timing", "personalization", "sweep", "guard"):
        assert str(tmp_path / f"{name}.json") in md
    assert str(tmp_path / "runs") in md


def test_packing_results_without_an_eight_slot_row_are_refused(tmp_path):
    argv = _inputs(tmp_path, [_sweep_row(0, 0.8)], [])
    packing = json.loads((tmp_path / "packing.json").read_text())
    packing["rows"] = packing["rows"][:1]
    (tmp_path / "packing.json").write_text(json.dumps(packing))
    with pytest.raises(SystemExit, match="no lora row with 8 slots"):
        economics.main(argv)


def test_a_missing_input_is_named(tmp_path, capsys):
    argv = _inputs(tmp_path, [_sweep_row(0, 0.8)], [])
    (tmp_path / "guard.json").unlink()
    assert economics.main(argv) == 2
    assert "guard.json" in capsys.readouterr().err
