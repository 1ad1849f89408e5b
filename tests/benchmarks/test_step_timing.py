"""benchmarks/step_timing.py: the stop-step part replays DVAR at evalEvery 1 and 5 on one run's
series, with each method's own default threshold."""

from __future__ import annotations

import pytest
from script_module import load_script

from personalize.criteria import stop_threshold
from personalize.reference_batch import ReferenceBatch
from personalize.spec import parse_spec

ORIGINAL_EVALUATION = ReferenceBatch.deterministic_loss
st = load_script("step_timing", "step_timing_under_test")


def test_importing_the_script_leaves_the_reference_batch_untimed():
    assert ReferenceBatch.deterministic_loss is ORIGINAL_EVALUATION


def test_stop_step_shift_replays_each_method_with_its_default_threshold(tmp_path, monkeypatch):
    def falling_then_flat(spec_dict):  # (step, train_loss, L_det, seconds): L_det flat from step 40
        return [(s, 0.1, 0.1 - 0.05 * min(s, 40) / 40 + 1e-4 * (s % 3), 0.01) for s in range(1, 201)]

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
