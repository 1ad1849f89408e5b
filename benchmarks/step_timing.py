"""Seconds per training step with and without deterministic-loss tracking, and how far the stop
step moves between evalEvery 1 and 5.

    python benchmarks/step_timing.py [--rounds 3] [--steps 12] [--stop-max-steps 300]

Timing: for each method, three conditions - no tracking (L_det never evaluated), evalEvery 1 and
evalEvery 5 - are run side by side in one process, interleaved in rounds (the condition order
rotates each round), so that load from other processes on the machine hits all of them alike.
Each run trains a fresh copy of the tiny pipeline; the first step of each run (warm-up) is not
counted. Ratios are median step time of a condition over median step time without tracking.

Paired timing (robust to drift): in the evalEvery-1 runs every step's training part and its
L_det evaluation are timed back to back, so both see the same machine load; the per-step ratios
(train + eval) / train and (train + eval / 5) / train are reported as medians, with the
evaluation's cost as a fraction of a training step.

Stop step: one run per method evaluates L_det at every step; because the training randomness
is independent of the evaluations (separate generators) and L_det at a step does not depend on
earlier evaluations, the evalEvery-5 series is exactly every 5th value of that same run. DVAR
with the same window in steps is replayed on both series.

Writes benchmarks/results/step_timing.json and step_timing.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from personalize.criteria import StopPolicy, make_criterion, stop_threshold, window_in_evaluations
from personalize.data import examples_of
from personalize.errors import TrainerInputError
from personalize.identifier import setup_identifier
from personalize.loop import StepRecord, train_stage
from personalize.methods import learns_embedding, plan_stages
from personalize.pipeline_io import builtin_tiny_world_folder, load_base_pipeline, models_of
from personalize.spec import parse_spec
from personalize.world import concept_by_name, write_concept_images
from personalize.world.provenance import installed_world
from personalize.world.tiny_models import build_tiny_pipeline_folder

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("textualInversion", "dreambooth", "lora", "customDiffusion", "tiDreambooth")
STOP_METHODS = ("textualInversion", "dreambooth", "lora", "customDiffusion")
NO_TRACKING = 100_000  # an evalEvery larger than the run: L_det is never evaluated
CONDITIONS = {"no_tracking": NO_TRACKING, "eval_every_1": 1, "eval_every_5": 5}


def make_spec(method: str, model: dict, concept_dir: Path, steps: int, eval_every: int, window: int = 60) -> dict:
    spec = {
        "baseModel": model,
        "method": method,
        "concept": {"images": {"path": str(concept_dir)}, "classNoun": "triangle"},
        "training": {"maxSteps": steps, "batchSize": 4, "seed": 0},
        "earlyStopping": {"criterion": "none", "evalEvery": eval_every, "referenceBatchSize": 4, "window": window},
    }
    if method in ("dreambooth", "lora", "customDiffusion"):
        spec["priorPreservation"] = {"enabled": False}
    if method == "tiDreambooth":
        spec["tiDreambooth"] = {"stage1MaxSteps": steps}
    return spec


def train(spec_dict: dict) -> list[StepRecord]:
    """One fresh run: what the loop reported at each step, over all stages."""
    spec = parse_spec(spec_dict)
    models = models_of(load_base_pipeline(spec.base_model))
    ident = setup_identifier(
        models.tokenizer, models.text_encoder, "auto", learns_embedding=learns_embedding(spec),
        initializer=spec.initializer_token,
    )
    examples = examples_of(spec, ident.text, models.unet.config.sample_size * 4)
    rows: list[StepRecord] = []
    for index, stage in enumerate(plan_stages(spec)):
        train_stage(stage, spec, models, ident, examples, None, Accelerator(cpu=True), rows.append, stage_index=index)
    return rows


def step_timing(model: dict, concept_dir: Path, rounds: int, steps: int) -> dict:
    results = {}
    names = list(CONDITIONS)
    for method in METHODS:
        seconds: dict[str, list[float]] = {name: [] for name in names}
        paired_e1, paired_e5, eval_fraction = [], [], []
        for round_index in range(rounds):
            turn = round_index % len(names)
            order = names[turn:] + names[:turn]  # rotate the order each round
            for name in order:
                rows = train(make_spec(method, model, concept_dir, steps, CONDITIONS[name]))
                seconds[name] += [r.seconds for r in rows if r.step > 1]
                if name == "eval_every_1":  # one evaluation per step: split each step in two
                    for r in rows:
                        if r.step > 1:
                            train_part = r.seconds - r.evaluation_seconds
                            paired_e1.append(r.seconds / train_part)
                            paired_e5.append((train_part + r.evaluation_seconds / 5) / train_part)
                            eval_fraction.append(r.evaluation_seconds / train_part)
        medians = {name: statistics.median(v) for name, v in seconds.items()}
        results[method] = {
            "median_step_seconds": {k: round(v, 5) for k, v in medians.items()},
            "ratio_to_no_tracking": {
                k: round(medians[k] / medians["no_tracking"], 3) for k in names if k != "no_tracking"
            },
            "steps_timed_per_condition": len(seconds["no_tracking"]),
            "paired_ratio": {
                "eval_every_1": round(statistics.median(paired_e1), 3),
                "eval_every_5": round(statistics.median(paired_e5), 3),
            },
            "eval_seconds_over_train_step_seconds": round(statistics.median(eval_fraction), 3),
        }
        print(method, results[method], flush=True)
    return results


def stop_step(values: list[tuple[int, float]], window_steps: int, eval_every: int, threshold: float, max_steps: int):
    policy = StopPolicy(make_criterion("dvar", window_in_evaluations(window_steps, eval_every), threshold), max_steps)
    for step, value in values:
        if step % eval_every == 0:
            policy.update(value)
        reason = policy.check(step)
        if reason is not None:
            return step, reason.value
    return None, None


def stop_step_shift(model: dict, concept_dir: Path, max_steps: int, window: int) -> dict:
    results = {}
    for method in STOP_METHODS:
        spec = make_spec(method, model, concept_dir, max_steps, 1, window)
        threshold = stop_threshold(parse_spec(spec))  # the method's DVAR default, as a run resolves it
        started = time.monotonic()
        rows = train(spec)
        series = [(r.step, r.deterministic_loss) for r in rows]
        at1 = stop_step(series, window, 1, threshold, max_steps)
        at5 = stop_step(series, window, 5, threshold, max_steps)
        results[method] = {
            "window_steps": window,
            "threshold": threshold,
            "stop_eval_every_1": {"step": at1[0], "reason": at1[1]},
            "stop_eval_every_5": {"step": at5[0], "reason": at5[1]},
            "moved_steps": None if None in (at1[0], at5[0]) else at5[0] - at1[0],
            "run_seconds": round(time.monotonic() - started, 1),
        }
        print(method, results[method], flush=True)
    return results


def markdown(report: dict) -> str:
    lines = [
        "# Step timing: deterministic-loss tracking cost and evalEvery",
        "",
        f"Model: {report['model']}; {report['machine']}; torch threads {report['torch_threads']}; "
        f"batch size 4, reference batch 4; {report['rounds']} interleaved rounds x {report['steps_per_run']} steps "
        "per condition (first step of each run not counted). Command: `python benchmarks/step_timing.py`.",
        "",
        "| method | s/step no tracking | s/step evalEvery 1 | s/step evalEvery 5 | ratio e1 | ratio e5 "
        "| paired ratio e1 | paired ratio e5 | eval / train step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, r in report["step_timing"].items():
        s, q = r["median_step_seconds"], r["ratio_to_no_tracking"]
        lines.append(
            f"| {method} | {s['no_tracking']:.4f} | {s['eval_every_1']:.4f} | {s['eval_every_5']:.4f} "
            f"| {q['eval_every_1']:.2f} | {q['eval_every_5']:.2f} | {r['paired_ratio']['eval_every_1']:.2f} "
            f"| {r['paired_ratio']['eval_every_5']:.2f} | {r['eval_seconds_over_train_step_seconds']:.2f} |"
        )
    lines += [
        "",
        "Ratios: whole runs per condition, interleaved (end to end, sensitive to load from other "
        "processes). Paired: the same steps' training and evaluation timed back to back.",
        "",
        f"Stop step of DVAR (window {report['stop_window_steps']} steps, method threshold, maxSteps "
        f"{report['stop_max_steps']}) on one run, replayed at evalEvery 1 and 5:",
        "",
        "| method | threshold | stop at evalEvery 1 | stop at evalEvery 5 | moved (steps) |",
        "|---|---|---|---|---|",
    ]
    for method, r in report["stop_step_shift"].items():
        a, b = r["stop_eval_every_1"], r["stop_eval_every_5"]
        lines.append(
            f"| {method} | {r['threshold']} | {a['step']} ({a['reason']}) | {b['step']} ({b['reason']}) | {r['moved_steps']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="steps per timed run")
    parser.add_argument("--stop-max-steps", type=int, default=300)
    parser.add_argument("--stop-window", type=int, default=60, help="DVAR window in steps for the stop-step part")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        try:
            model, model_name = {"builtin": "tiny-world"}, f"tiny world ({builtin_tiny_world_folder()})"
            world = installed_world()
        except TrainerInputError:
            folder = build_tiny_pipeline_folder(Path(tmp) / "pipeline", seed=0)
            model, model_name = {"path": str(folder)}, "random-weight tiny test pipeline (tiny world not installed)"
            world = None
        concept_dir = Path(tmp) / "concept"
        write_concept_images(concept_by_name("red_striped_triangle"), 12, concept_dir, seed=0)
        started = time.monotonic()
        report = {
            "world": world,
            "model": model_name,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
            "torch_threads": args.threads,
            "rounds": args.rounds,
            "steps_per_run": args.steps,
            "stop_max_steps": args.stop_max_steps,
            "stop_window_steps": args.stop_window,
            "step_timing": step_timing(model, concept_dir, args.rounds, args.steps),
            "stop_step_shift": stop_step_shift(model, concept_dir, args.stop_max_steps, args.stop_window),
        }
        report["wall_seconds"] = round(time.monotonic() - started, 1)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_timing.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "step_timing.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
