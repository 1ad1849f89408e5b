"""benchmarks/guard_study.py: DVAR held until the CLIP criterion has fired too, replayed on a
recorded baseline's L_det series and CLIP-I curve."""

from __future__ import annotations

import json

import pytest
from script_module import load_script

guard = load_script("guard_study", "guard_study_under_test")

WINDOW, THRESHOLD = 20, 0.15


def _losses(n=200, knee=30):
    """L_det falls until `knee`, then wobbles around a floor: DVAR stops soon after the knee."""
    return [0.1 - 0.04 * min(i, knee) / knee + 0.002 * ((i * 7919) % 13 - 6) / 6 for i in range(1, n + 1)]


def _write(runs, concept, curve):
    steps = list(range(25, 201, 25))
    (runs / f"lora_baseline_{concept}.json").write_text(json.dumps({
        "kind": "run", "method": "lora", "variant": "baseline", "concept": concept, "steps": 200,
        "window": WINDOW, "threshold": THRESHOLD,
        "series": {"eval_steps": list(range(1, 201)), "deterministic_loss": _losses(),
                   "curve_steps": steps, "curve_clip_i": [0.5 + g for g in curve]}}))
    (runs / f"base_{concept}.json").write_text(json.dumps({"clip_i": 0.5}))


def test_the_clip_criterion_stops_after_patience_checks_without_a_gain():
    steps, gains = [0, 25, 50, 75, 100, 125, 150], [0.0, 0.02, 0.05, 0.10, 0.09, 0.10, 0.08]
    assert guard.clip_stop(steps, gains, 2) == 125  # 100 and 125 do not beat 0.10
    assert guard.clip_stop(steps, gains, 3) == 150
    assert guard.clip_stop(steps, gains, 4) is None


def test_the_guard_holds_a_dvar_stop_until_the_curve_has_flattened(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    late = [0.0, 0.0, 0.0, 0.05, 0.09, 0.10, 0.10, 0.10]  # learns between steps 75 and 150
    _write(runs, "red_striped_triangle", late)
    _write(runs, "blue_dotted_star", [0.0] * 8)  # never learns: counts for steps, not for "kept"
    baselines = guard.load_baselines(runs, "lora", ["red_striped_triangle", "blue_dotted_star"])
    learner = baselines["red_striped_triangle"]
    dvar = guard.dvar_stop("lora", learner)
    alone, fooled, waited = (guard.guarded_outcome(learner, dvar, p) for p in (None, 2, 3))
    assert alone["stop"] < 50 and alone["kept"] == pytest.approx(0.0)  # DVAR stopped before learning began
    # checks at 50 and 75 bring no gain over 25's: patience 2 fires at 75, still before the learning
    assert fooled["stop"] == 75 and fooled["kept"] == pytest.approx(0.0) and fooled["clip_checks"] == 3
    # patience 3 is reset by the rise and never fires within the budget: the run goes to 200
    assert waited["stop"] == 200 and waited["kept"] == pytest.approx(1.0) and waited["clip_checks"] == 8
    rows = guard.study("lora", baselines, [None, 3])
    assert [r["patience"] for r in rows] == [None, 3]
    assert rows[0]["kept_per_concept"] == [pytest.approx(0.0)] and rows[1]["kept_per_concept"] == [pytest.approx(1.0)]
    assert guard.main(["--runs", str(runs), "--methods", "lora", "--patience", "2,3", "--out", str(tmp_path)]) == 0
    assert "DVAR + CLIP guard, patience 3 | 100%" in (tmp_path / "guard_study_dev.md").read_text()
