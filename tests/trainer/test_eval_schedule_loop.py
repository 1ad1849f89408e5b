"""The adaptive schedule in the training loop, per method: it evaluates fewer steps, stops within
5 steps of where evaluating at every step stops, and replay names the step the loop stopped at."""

from __future__ import annotations

from argparse import Namespace

import pytest
from accelerate import Accelerator

from personalize.data import load_concept_examples
from personalize.identifier import setup_identifier
from personalize.loop import train_stage
from personalize.methods import METHODS, learns_embedding, plan_stages
from personalize.pipeline_io import load_base_pipeline, models_of
from personalize.replay import run as replay_run
from personalize.run_files import write_losses_csv
from personalize.spec import parse_spec

from job_specs import job_spec

WINDOW, THRESHOLD, MAX_STEPS = 30, 0.3, 120


def run(pipeline_dir, concept_dir, method: str, early_stopping: dict):
    """One tiny run; per stage its rows and stop step."""
    spec = job_spec(pipeline_dir, concept_dir, method)
    spec["training"]["maxSteps"] = MAX_STEPS
    spec["earlyStopping"] = {"window": WINDOW, "threshold": THRESHOLD, "referenceBatchSize": 2, **early_stopping}
    if method == "tiDreambooth":
        spec["tiDreambooth"].update(stage1MaxSteps=MAX_STEPS, stage1Window=WINDOW, stage1Threshold=THRESHOLD)
    spec = parse_spec(spec)
    models = models_of(load_base_pipeline(spec.base_model))
    ident = setup_identifier(models.tokenizer, models.text_encoder, "auto", learns_embedding=learns_embedding(spec),
                             initializer="triangle")
    examples = load_concept_examples(spec.concept, ident.text, 32)
    stages = []
    for index, stage in enumerate(plan_stages(spec)):
        rows: list[dict] = []
        outcome, _ = train_stage(
            stage, spec, models, ident, examples, None, Accelerator(cpu=True),
            lambda step, tl, det, conv, sec: rows.append({"step": step, "train_loss": tl, "deterministic_loss": det,
                                                          "convergence_value": conv}),
            stage_index=index,
        )
        stages.append((rows, outcome))
    return stages


# TI+DreamBooth's second stage: at step 25, L_det spikes to 2.20 between values near 1.1 (one
# step of this tiny model's DreamBooth training going astray). Evaluating at every step, the spike
# dominates both variances until it leaves the window and the run stops at 55; the adaptive
# schedule evaluates steps 24 and 26 (the loss zigzags, 33 of 35 steps are measured) and stops at
# 35. No schedule that skips a step can see a one-step spike there; kept as a strict xfail so that
# the gap stays visible.
KNOWN_MISSES = {"tiDreambooth": "a one-step L_det spike at stage 2's step 25 is skipped: stops at 35, every step at 55"}


@pytest.mark.parametrize("method", [
    pytest.param(m, marks=pytest.mark.xfail(reason=KNOWN_MISSES[m], strict=True)) if m in KNOWN_MISSES else m
    for m in sorted(METHODS)
])
def test_adaptive_stops_near_every_step_and_replays_exactly(method, tiny_pipeline_dir, concept_dir, tmp_path):
    every = run(tiny_pipeline_dir, concept_dir, method, {"evalSchedule": "fixed", "evalEvery": 1})
    adaptive = run(tiny_pipeline_dir, concept_dir, method, {"evalSchedule": "adaptive"})
    for (rows_1, out_1), (rows_a, out_a) in zip(every, adaptive):
        assert out_1.reason.value == "ConvergenceThreshold"  # the comparison is about an early stop
        evaluated = [r["step"] for r in rows_a if r["deterministic_loss"] is not None]
        print(f"{method}: stop every step {out_1.stop_step}, adaptive {out_a.stop_step}, "
              f"evaluated {len(evaluated)}/{len(rows_a)}")
        assert abs(out_a.stop_step - out_1.stop_step) <= 5, (out_a.stop_step, out_1.stop_step)
        assert len(evaluated) < len(rows_a)  # it skipped evaluations
        # the same training: identical losses at the steps both runs evaluated
        by_step = {r["step"]: r["deterministic_loss"] for r in rows_1}
        assert all(by_step[r["step"]] == r["deterministic_loss"] for r in rows_a if r["deterministic_loss"] is not None)
        write_losses_csv(rows_a, tmp_path / "losses.csv")
        args = Namespace(file=str(tmp_path / "losses.csv"), criterion="dvar", window=WINDOW, threshold=THRESHOLD,
                         eval_every=None, min_steps=0, method=method, schedule="adaptive")
        assert replay_run(args)[0]["stop_step"] == out_a.stop_step
