"""benchmarks/stop_trace.py: how far L_det and CLIP-I had come at DVAR's stop, from a recorded
baseline's series."""

from __future__ import annotations

import json

import pytest
from script_module import load_script

from personalize.criteria import StopPolicy, build_criterion

st = load_script("stop_trace", "stop_trace_under_test")

WINDOW, THRESHOLD, BUDGET = 40, 0.15, 300


def _late_learner_run(concept="red_striped_triangle"):
    """L_det falls until step 50, then wobbles around a floor; CLIP-I keeps rising until step 200."""
    losses = [0.1 - 0.04 * min(i, 50) / 50 + 0.001 * ((i * 7919) % 13 - 6) / 6 for i in range(1, BUDGET + 1)]
    policy = StopPolicy(build_criterion("dvar", WINDOW, 1, THRESHOLD), max_steps=10**9)
    values, stop = [], None
    for step, loss in enumerate(losses, start=1):
        values.append(policy.update(loss))  # the convergence value (None until the window fills)
        stop = stop or (step if policy.check(step) is not None else None)
    curve_steps = list(range(25, BUDGET + 1, 25))
    return stop, {
        "kind": "run", "method": "lora", "variant": "baseline", "concept": concept, "window": WINDOW,
        "threshold": THRESHOLD, "steps": BUDGET, "dvar_stop": {"steps": stop},
        "series": {"eval_steps": list(range(1, BUDGET + 1)), "deterministic_loss": losses,
                   "convergence_steps": list(range(1, BUDGET + 1)), "convergence_value": values,
                   "curve_steps": curve_steps, "curve_clip_i": [0.4 + 0.2 * min(s, 200) / 200 for s in curve_steps]},
    }


def test_a_late_learner_has_finished_its_l_det_but_not_its_clip_i():
    stop, run = _late_learner_run()
    assert 50 < stop < 150
    t = st.trace(run, base_clip_i=0.4)
    assert t["dvar_stop"] == stop and t["plateau_gain"] == pytest.approx(0.2)
    assert t["l_det_progress_at_stop"] == pytest.approx(1.0, abs=0.05)
    assert t["clip_i_progress_at_stop"] == pytest.approx(stop / 200, abs=0.01)  # the curve is linear to 200
    assert t["s90"] == 200  # 90% of 0.2 is first scored at step 200 (0.18 at 180 is not a scored step)
    assert [r["step"] for r in t["rows"]] == run["series"]["curve_steps"]
    assert t["rows"][-1]["clip_i_progress"] == pytest.approx(1.0)


def test_main_traces_every_baseline_of_the_set_and_refuses_what_it_cannot_trace(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    _, run = _late_learner_run()
    (runs / "lora_baseline_red_striped_triangle.json").write_text(json.dumps(run))
    (runs / "base_red_striped_triangle.json").write_text(json.dumps({"clip_i": 0.4}))
    (runs / "lora_baseline_blue_dotted_star.json").write_text(json.dumps({**run, "series": {
        k: v for k, v in run["series"].items() if not k.startswith("curve")}}))  # no curve: left out
    (runs / "base_blue_dotted_star.json").write_text(json.dumps({"clip_i": 0.4}))
    assert st.main(["--runs", str(runs), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "stop_trace_dev.json").read_text())
    assert [t["concept"] for t in report["traces"]] == ["red_striped_triangle"]
    assert st.main(["--runs", str(runs), "--out", str(tmp_path), "lora/red_striped_triangle"]) == 0
    assert "| step | L_det" in (tmp_path / "stop_trace_dev.md").read_text()  # named: step by step
    assert st.main(["--runs", str(runs), "lora/blue_dotted_star"]) == 2
    assert "not a baseline that observed DVAR and scored a CLIP-I curve" in capsys.readouterr().err


def test_the_wobble_is_the_plateau_scores_spread_over_its_gain_and_medians_skip_concepts_that_gained_too_little():
    _, run = _late_learner_run()
    run["series"]["curve_clip_i"][-4:] = [0.58, 0.62, 0.58, 0.62]  # gains 0.18/0.22: mean 0.2, std 0.02
    t = st.trace(run, base_clip_i=0.4)
    assert t["plateau_gain"] == pytest.approx(0.2) and t["clip_i_wobble"] == pytest.approx(0.1)
    lost = {**t, "concept": "blue_dotted_star", "plateau_gain": -0.05, "clip_i_progress_at_stop": -3.0, "clip_i_wobble": None}
    other = {**t, "method": "dreambooth", "clip_i_progress_at_stop": 0.5}
    within_wobble = {**t, "concept": "green_dotted_star", "plateau_gain": st.MIN_JUDGED_GAIN / 2,
                     "clip_i_progress_at_stop": 25.0}
    medians = st.method_medians([t, lost, other, within_wobble])
    assert medians["lora"] == {"concepts": 1, "l_det_progress_at_stop": t["l_det_progress_at_stop"],
                               "clip_i_progress_at_stop": t["clip_i_progress_at_stop"], "clip_i_wobble": 0.1}
    assert medians["dreambooth"]["clip_i_progress_at_stop"] == 0.5
    assert "| lora | 1 |" in st.medians_table(medians)
    assert "| blue_dotted_star | -0.050 |" in st.summary_table([lost]) and st.summary_table([lost]).rstrip().endswith("| - |")


def test_a_concept_that_lost_ground_has_no_wobble():
    _, run = _late_learner_run()
    run["series"]["curve_clip_i"] = [0.35] * len(run["series"]["curve_clip_i"])  # below the base model's 0.4
    assert st.trace(run, base_clip_i=0.4)["clip_i_wobble"] is None
