"""The adaptive schedule in the training loop, per method: it evaluates fewer steps, stops within
5 steps of where evaluating at every step stops (or, past a one-step L_det spike it did not
evaluate, between 5 steps before that spike and the every-step stop), and replay names the step
the loop stopped at."""

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
            lambda r: rows.append({"step": r.step, "train_loss": r.train_loss, "deterministic_loss": r.deterministic_loss,
                                   "convergence_value": r.convergence_value}),
            stage_index=index,
        )
        stages.append((rows, outcome))
    return stages


RUNS: dict[tuple[str, str], list] = {}  # (method, schedule) -> stages; both tests below read them


def runs_of(method: str, pipeline_dir, concept_dir):
    """The every-step and the adaptive run of one method (trained once per test session)."""
    for schedule, early_stopping in (("every", {"evalSchedule": "fixed", "evalEvery": 1}),
                                     ("adaptive", {"evalSchedule": "adaptive"})):
        if (method, schedule) not in RUNS:
            RUNS[method, schedule] = run(pipeline_dir, concept_dir, method, early_stopping)
    return RUNS[method, "every"], RUNS[method, "adaptive"]


def skipped_spikes(rows_every: list[dict], rows_adaptive: list[dict], stop: int) -> list[int]:
    """Steps in the window before the every-step stop where L_det jumped to over 1.5x both
    neighbours for one step and the adaptive run did not evaluate. No schedule that skips a step
    can see such a spike: evaluating every step, it dominates both variances until it leaves the
    window (a tiny DreamBooth step going astray can do this, depending on the CPU's kernels)."""
    loss = {r["step"]: r["deterministic_loss"] for r in rows_every}
    measured = {r["step"] for r in rows_adaptive if r["deterministic_loss"] is not None}
    return [s for s in range(max(2, stop - WINDOW), stop)
            if s + 1 in loss and loss[s] > 1.5 * max(loss[s - 1], loss[s + 1]) and s not in measured]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_adaptive_stops_near_every_step_and_replays_exactly(method, tiny_pipeline_dir, concept_dir, tmp_path):
    every, adaptive = runs_of(method, tiny_pipeline_dir, concept_dir)
    for (rows_1, out_1), (rows_a, out_a) in zip(every, adaptive):
        assert out_1.reason.value == "ConvergenceThreshold"  # the comparison is about an early stop
        evaluated = [r["step"] for r in rows_a if r["deterministic_loss"] is not None]
        spikes = skipped_spikes(rows_1, rows_a, out_1.stop_step)
        print(f"{method}: stop every step {out_1.stop_step}, adaptive {out_a.stop_step}, "
              f"evaluated {len(evaluated)}/{len(rows_a)}, skipped spikes {spikes}")
        if spikes:
            # The known blind spot: the every-step run waits for the spike to leave its window,
            # the adaptive run does not. Up to the first spike both saw the same losses, and the
            # every-step run had not stopped there, so the adaptive run stops at most 5 steps
            # before that spike (the usual tolerance) and before the every-step run.
            assert spikes[0] - 5 <= out_a.stop_step < out_1.stop_step, (spikes, out_a.stop_step, out_1.stop_step)
        else:
            assert abs(out_a.stop_step - out_1.stop_step) <= 5, (out_a.stop_step, out_1.stop_step)
        # the same training: identical losses at the steps both runs evaluated
        by_step = {r["step"]: r["deterministic_loss"] for r in rows_1}
        assert all(by_step[r["step"]] == r["deterministic_loss"] for r in rows_a if r["deterministic_loss"] is not None)
        write_losses_csv(rows_a, tmp_path / "losses.csv")
        args = Namespace(file=str(tmp_path / "losses.csv"), criterion="dvar", window=WINDOW, threshold=THRESHOLD,
                         eval_every=None, min_steps=0, method=method, schedule="adaptive")
        assert replay_run(args)[0]["stop_step"] == out_a.stop_step


def test_adaptive_skips_evaluations(tiny_pipeline_dir, concept_dir):
    """Over all methods' stages it evaluates clearly fewer steps than it trains. A single stage
    may need every step (an L_det that zigzags by more than the tolerance everywhere)."""
    evaluated = trained = 0
    for method in sorted(METHODS):
        for rows, _ in runs_of(method, tiny_pipeline_dir, concept_dir)[1]:
            evaluated += sum(r["deterministic_loss"] is not None for r in rows)
            trained += len(rows)
    assert evaluated < 0.9 * trained, (evaluated, trained)
