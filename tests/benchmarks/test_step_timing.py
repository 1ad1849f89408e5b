"""benchmarks/step_timing.py: the stop-step part replays DVAR at evalEvery 1 and 5 on one run's
series, with each method's own default threshold."""

from __future__ import annotations

import pytest
from script_module import load_script

from personalize.criteria import stop_threshold
from personalize.loop import StepRecord
from personalize.spec import parse_spec

st = load_script("step_timing", "step_timing_under_test")


def test_stop_step_shift_replays_each_method_with_its_default_threshold(tmp_path, monkeypatch):
    def falling_then_flat(spec_dict):  # L_det flat from step 40
        return [StepRecord(s, 0.1, 0.1 - 0.05 * min(s, 40) / 40 + 1e-4 * (s % 3), None, 0.01, 0.003)
                for s in range(1, 201)]

    monkeypatch.setattr(st, "train", falling_then_flat)
    shift = st.stop_step_shift({"builtin": "tiny-world"}, tmp_path, max_steps=200, window=30)
    assert sorted(shift) == sorted(st.STOP_METHODS)
    for method, row in shift.items():
        spec = parse_spec(st.make_spec(method, {"builtin": "tiny-world"}, tmp_path, 200, 1, 30))
        assert row["threshold"] == pytest.approx(stop_threshold(spec))
        assert row["stop_eval_every_1"]["reason"] == "ConvergenceThreshold"
        assert 40 < row["stop_eval_every_1"]["step"] < 200
        assert row["moved_steps"] == row["stop_eval_every_5"]["step"] - row["stop_eval_every_1"]["step"]
    assert shift["dreambooth"]["threshold"] != shift["lora"]["threshold"]  # per-method defaults differ


def test_step_timing_splits_each_step_into_training_and_the_evaluation_the_loop_timed(tmp_path, monkeypatch):
    def timed_run(spec_dict):  # 40 ms steps; 10 ms of each spent on L_det when it is evaluated
        every = spec_dict["earlyStopping"]["evalEvery"]
        return [StepRecord(s, 0.1, 0.05 if s % every == 0 else None, None, 0.04 if s % every == 0 else 0.03,
                           0.01 if s % every == 0 else None) for s in range(1, 13)]

    monkeypatch.setattr(st, "train", timed_run)
    result = st.step_timing({"builtin": "tiny-world"}, tmp_path, rounds=1, steps=12)["lora"]
    assert result["eval_seconds_over_train_step_seconds"] == pytest.approx(1 / 3, abs=1e-3)
    assert result["paired_ratio"] == {"eval_every_1": pytest.approx(4 / 3, abs=1e-3),
                                      "eval_every_5": pytest.approx(1 + 1 / 15, abs=1e-3)}
    assert result["ratio_to_no_tracking"]["eval_every_1"] == pytest.approx(4 / 3, abs=1e-3)
