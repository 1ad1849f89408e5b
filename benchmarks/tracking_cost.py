"""What deterministic-loss tracking costs, and where it stops, per method: the adaptive evaluation
schedule against evaluating at every step and against no tracking at all, side by side in one run.

    python benchmarks/tracking_cost.py [--rounds 3] [--threads 2] [--window 60] [--max-steps 400]

Per method, on the tiny world (one concept, 8 images, batch 4, reference batch 4):

1. Decisions. One DVAR run evaluating at every step (evalSchedule fixed, evalEvery 1) and one
   with the adaptive schedule (evalSchedule adaptive, its defaults). Training is identical in
   both (the reference batch has its own generator), so the stop steps compare the schedules
   alone. The adaptive run's recorded series is replayed (`personalize-train replay`) to check
   that replay names the live stop step.
2. Cost. `--rounds` interleaved triples (the order rotates): the adaptive DVAR run to its stop,
   the every-step DVAR run (the spec's default evaluation settings) to its stop, and an untracked
   run (criterion none, L_det never evaluated) of the adaptive run's steps. A ratio is the loop's
   total step time (training + evaluations, every step counted) of a tracked run over the
   untracked one, over the steps both made; reported as the median over rounds with min and max.

Writes benchmarks/results/tracking_cost.json and tracking_cost.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import torch
from accelerate import Accelerator

from personalize.data import load_concept_examples
from personalize.eval_schedule import ScheduleKnobs
from personalize.identifier import setup_identifier
from personalize.loop import train_stage
from personalize.methods import learns_embedding, plan_stages
from personalize.pipeline_io import load_base_pipeline, models_of
from personalize.replay import run as replay_run
from personalize.run_files import write_losses_csv
from personalize.spec import parse_spec
from personalize.world import concept_by_name, write_concept_images
from personalize.world.provenance import installed_world
from personalize.world.shapes import CONCEPT_SETS, concept_set

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recorded_runs import adaptive_stop, command_line, every_step_runs, every_step_stop, relative_to_repo, runs_world  # noqa: E402  (a sibling script module)

RESULTS = Path(__file__).resolve().parent / "results"
CONCEPT = "red_striped_triangle"
IMAGES = 8
# The tiny world's learning rates (benchmarks/personalization.py) and the methods' DVAR thresholds.
LEARNING_RATES = {"textualInversion": 0.02, "dreambooth": 3e-4, "lora": 3e-3, "customDiffusion": 1e-3,
                  "tiDreambooth": 3e-4}
THRESHOLDS = {"textualInversion": 0.15, "dreambooth": 0.4, "lora": 0.15, "customDiffusion": 0.15, "tiDreambooth": 0.4}
NO_TRACKING = 100_000  # an evalEvery beyond the run: L_det is never evaluated


def make_spec(method: str, concept_dir: Path, max_steps: int, window: int, early_stopping: dict) -> dict:
    spec = {
        "baseModel": {"builtin": "tiny-world"},
        "method": method,
        "concept": {"images": {"path": str(concept_dir)}, "classNoun": "triangle"},
        "training": {"maxSteps": max_steps, "batchSize": 4, "seed": 0, "learningRate": LEARNING_RATES[method]},
        "earlyStopping": {"window": window, "threshold": THRESHOLDS[method], **early_stopping},
    }
    if method in ("dreambooth", "lora", "customDiffusion"):
        spec["priorPreservation"] = {"enabled": False}
    if method == "tiDreambooth":
        spec["tiDreambooth"] = {"stage1MaxSteps": max_steps, "stage1Window": window, "stage1Threshold": 0.15,
                                "stage1LearningRate": LEARNING_RATES["textualInversion"]}
    return spec


ADAPTIVE = {"criterion": "dvar", "evalSchedule": "adaptive"}
EVERY_STEP = {"criterion": "dvar", "evalSchedule": "fixed", "evalEvery": 1}
UNTRACKED = {"criterion": "none", "evalSchedule": "fixed", "evalEvery": NO_TRACKING}


def train(spec_dict: dict) -> tuple[list[list[dict]], list[int]]:
    """One fresh run: per stage, rows {step, train_loss, deterministic_loss, convergence_value,
    seconds}; and the stop step of each stage."""
    spec = parse_spec(spec_dict)
    models = models_of(load_base_pipeline(spec.base_model))
    ident = setup_identifier(models.tokenizer, models.text_encoder, "auto", learns_embedding=learns_embedding(spec),
                             initializer=spec.initializer_token)
    examples = load_concept_examples(spec.concept, ident.text, models.unet.config.sample_size * 4)
    stages, stops = [], []
    for index, stage in enumerate(plan_stages(spec)):
        rows: list[dict] = []
        outcome, _ = train_stage(
            stage, spec, models, ident, examples, None, Accelerator(cpu=True),
            lambda r: rows.append({"step": r.step, "train_loss": r.train_loss, "deterministic_loss": r.deterministic_loss,
                                   "convergence_value": r.convergence_value, "seconds": r.seconds}),
            stage_index=index,
        )
        stages.append(rows)
        stops.append(outcome.stop_step)
    return stages, stops


def replayed_stops(stages: list[list[dict]], window: int, threshold: float, work: Path) -> list[int | None]:
    stops = []
    for index, rows in enumerate(stages):
        path = work / f"losses_stage{index}.csv"
        write_losses_csv(rows, path)
        args = Namespace(file=str(path), criterion="dvar", window=window, threshold=threshold, eval_every=None,
                         min_steps=0, method="textualInversion", schedule="adaptive")
        stops.append(replay_run(args)[0]["stop_step"])
    return stops


def loop_seconds(stages: list[list[dict]], limits: list[int] | None = None) -> float:
    """The loop's total step time; with `limits`, of each stage's first limits[i] steps only."""
    limits = limits or [len(rows) for rows in stages]
    return sum(r["seconds"] for rows, limit in zip(stages, limits) for r in rows if r["step"] <= limit)


def measure(method: str, concept_dir: Path, args, work: Path) -> dict:
    started = time.monotonic()
    every, every_stops = train(make_spec(method, concept_dir, args.max_steps, args.window, EVERY_STEP))
    adaptive, adaptive_stops = train(make_spec(method, concept_dir, args.max_steps, args.window, ADAPTIVE))
    threshold = THRESHOLDS[method]
    stage_thresholds = [0.15, threshold] if method == "tiDreambooth" else [threshold]  # stage 1 is TI's
    replayed = [replayed_stops([rows], args.window, t, work)[0] for rows, t in zip(adaptive, stage_thresholds)]
    evaluations = sum(r["deterministic_loss"] is not None for rows in adaptive for r in rows)
    steps = sum(adaptive_stops)
    # Untracked runs of the same steps (per stage: the adaptive run's stop of that stage).
    untracked_spec = make_spec(method, concept_dir, adaptive_stops[0], args.window, UNTRACKED)
    if method == "tiDreambooth":
        untracked_spec["tiDreambooth"]["stage1MaxSteps"] = adaptive_stops[0]
        untracked_spec["training"]["maxSteps"] = adaptive_stops[1]
    ratios, every_ratios, tracked_s, untracked_s, every_s = [], [], [], [], []
    orders = (("tracked", "every", "untracked"), ("untracked", "tracked", "every"), ("every", "untracked", "tracked"))
    for r in range(args.rounds):
        runs = {}
        for name in orders[r % len(orders)]:
            spec = {"tracked": lambda: make_spec(method, concept_dir, args.max_steps, args.window, ADAPTIVE),
                    "every": lambda: make_spec(method, concept_dir, args.max_steps, args.window, EVERY_STEP),
                    "untracked": lambda: untracked_spec}[name]()
            stages, stops = train(spec)
            runs[name] = stages
            if name == "tracked":
                assert stops == adaptive_stops, (stops, adaptive_stops)  # deterministic: the same decision
            if name == "every":
                assert stops == every_stops, (stops, every_stops)
        limits = [len(rows) for rows in runs["untracked"]]  # the adaptive run's steps, per stage
        untracked = loop_seconds(runs["untracked"])
        ratios.append(loop_seconds(runs["tracked"]) / untracked)
        # evaluating at every step, over the steps both runs made
        every_ratios.append(loop_seconds(runs["every"], limits) / loop_seconds(runs["untracked"], limits))
        tracked_s.append(loop_seconds(runs["tracked"]))
        untracked_s.append(untracked)
        every_s.append(loop_seconds(runs["every"], limits))
    result = {
        "threshold": threshold,
        "stop_every_step": every_stops,
        "stop_adaptive": adaptive_stops,
        "stop_moved": [a - b for a, b in zip(adaptive_stops, every_stops)],
        "replay_stop_adaptive": replayed,
        "replay_matches_live": replayed == adaptive_stops,
        "adaptive_steps": steps,
        "adaptive_evaluations": evaluations,
        "adaptive_evaluated_fraction": round(evaluations / steps, 3),
        "loop_ratio_adaptive_over_untracked": {
            "median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3), "max": round(max(ratios), 3),
        },
        "loop_ratio_every_step_over_untracked": {
            "median": round(statistics.median(every_ratios), 3), "min": round(min(every_ratios), 3),
            "max": round(max(every_ratios), 3),
        },
        "loop_seconds": {"tracked": [round(s, 2) for s in tracked_s], "untracked": [round(s, 2) for s in untracked_s],
                         "every_step": [round(s, 2) for s in every_s]},
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    print(method, json.dumps(result), flush=True)
    return result


def every_step_series(runs_dir: Path, concepts: set[str] | None = None) -> dict[str, dict]:
    """method/concept -> the longest every-step L_det series the personalization benchmark recorded:
    a baseline that observed DVAR (its whole budget) or else a DVAR run (up to its own stop)."""
    found: dict[str, dict] = {}
    for record in every_step_runs(runs_dir, concepts=concepts):
        name, losses = f"{record['method']}/{record['concept']}", record["series"]["deterministic_loss"]
        if name not in found or len(losses) > len(found[name]["losses"]):
            found[name] = {"method": record["method"], "window": record["window"],
                           "threshold": record["threshold"], "losses": losses,
                           "whole_budget": record["variant"] == "baseline"}
    return found


def recorded_series(series: dict[str, dict], knobs: ScheduleKnobs = ScheduleKnobs()) -> dict:
    """The adaptive schedule (its defaults, or `knobs`) against every step on recorded series
    (`every_step_series`). A series that ends at its own every-step stop (a DVAR run's) cannot
    show a later adaptive stop: those count as `later_than_recorded`."""
    runs = {}
    for name, r in series.items():
        every = every_step_stop(r["losses"], r["window"], r["threshold"], r["method"])
        stop, evaluations = adaptive_stop(r["losses"], r["window"], r["threshold"], knobs)
        if every is None and stop is None:
            continue  # neither stops within the recorded budget: nothing to compare
        runs[name] = {
            "window": r["window"], "stop_every_step": every, "stop_adaptive": stop,
            "moved": None if stop is None or every is None else stop - every,
            "evaluated_fraction": round(evaluations / (stop or len(r["losses"])), 3),
        }
    moved = [r["moved"] for r in runs.values()]
    fractions = [r["evaluated_fraction"] for r in runs.values()]
    return {
        "runs": runs,
        "within_5_steps": sum(m is not None and abs(m) <= 5 for m in moved),
        "later_than_recorded": sum(m is None for m in moved),
        "count": len(moved),
        "mean_evaluated_fraction": round(statistics.fmean(fractions), 3) if fractions else None,
    }


# The trade-off between evaluations saved and stops kept: the adaptive schedule's knobs on a grid.
FRONTIER_GRID = {"near": (1.0, 1.5), "far": (3.0, 6.0), "tolerance": (0.35, 0.7, 1.4, math.inf),
                 "measurements_per_window": (2, 4)}


def frontier(series: dict[str, dict]) -> list[dict]:
    """Per knob setting: stops within 5 steps of every step, and the mean evaluated fraction."""
    rows = []
    for values in itertools.product(*FRONTIER_GRID.values()):
        knobs = dict(zip(FRONTIER_GRID, values))
        summary = recorded_series(series, ScheduleKnobs(**knobs))
        rows.append({**knobs, "within_5_steps": summary["within_5_steps"], "count": summary["count"],
                     "mean_evaluated_fraction": summary["mean_evaluated_fraction"]})
    return sorted(rows, key=lambda r: (-r["within_5_steps"], r["mean_evaluated_fraction"]))


FIXED_EVERY = (2, 3, 4, 5, 6, 8, 10)  # the paper's own route: evaluate every k steps, DVAR over those values


def fixed_every(series: dict[str, dict], everies: tuple[int, ...] = FIXED_EVERY) -> list[dict]:
    """The fixed schedule at each evalEvery in `everies` against every step, on the same recorded series."""
    each = {name: every_step_stop(r["losses"], r["window"], r["threshold"], r["method"]) for name, r in series.items()}
    rows = []
    for every in everies:
        moved = []
        for name, r in series.items():
            stop = every_step_stop(r["losses"], r["window"], r["threshold"], r["method"], eval_every=every)
            if each[name] is not None or stop is not None:
                moved.append(None if each[name] is None or stop is None else stop - each[name])
        distances = [abs(m) for m in moved if m is not None]
        rows.append({"eval_every": every, "evaluated_fraction": round(1 / every, 3), "count": len(moved),
                     "within_5_steps": sum(d <= 5 for d in distances),
                     "median_distance": statistics.median(distances) if distances else None,
                     "max_distance": max(distances) if distances else None})
    return rows


def recorded_markdown(summary: dict) -> str:
    lines = [
        "# The adaptive schedule on recorded every-step DVAR series",
        "",
        f"Series: `{summary['runs_dir']}` (L_det at every step, each run's own DVAR window and threshold; a "
        "baseline's whole budget where the benchmark recorded one, else a DVAR run up to its stop). "
        f"Concepts: the {summary.get('concept_set', 'all')} set. "
        f"Command: `{summary['command']}`. "
        f"Within 5 steps: {summary['within_5_steps']} of {summary['count']}; not stopped by the end of the "
        f"recorded series: {summary['later_than_recorded']}; mean evaluated fraction "
        f"{summary['mean_evaluated_fraction']}.",
        "",
        "| run | stop, every step | stop, adaptive | moved | evaluated fraction |",
        "|---|---|---|---|---|",
    ]
    for name, r in summary["runs"].items():
        lines.append(f"| {name} | {r['stop_every_step']} | {r['stop_adaptive']} | {r['moved']} | {r['evaluated_fraction']} |")
    if summary.get("frontier"):
        lines += [
            "",
            "## The trade-off: the schedule's knobs on a grid",
            "",
            "Per `personalize.eval_schedule.ScheduleKnobs` (the first row with all stops kept is the "
            "cheapest that keeps them): stops within 5 steps of every step, and the mean share of steps "
            "evaluated. A tracked run costs about 1 + fraction x (L_det's cost / a step's); at every step that "
            "is the every-step ratio `python benchmarks/tracking_cost.py` measures in the training loop "
            "(1.31-1.37 on the first world: benchmarks/results/first_world/tracking_cost.md).",
            "",
            "| near | far | tolerance | measurements per window | within 5 steps | mean evaluated fraction |",
            "|---|---|---|---|---|---|",
        ]
        for r in summary["frontier"]:
            lines.append(f"| {r['near']} | {r['far']} | {r['tolerance']} | {r['measurements_per_window']} "
                         f"| {r['within_5_steps']}/{r['count']} | {r['mean_evaluated_fraction']} |")
    if summary.get("fixed_every"):
        lines += [
            "",
            "## The fixed schedule at evalEvery k on the same series",
            "",
            "The other route to fewer evaluations, and the paper's (a validation step every k training "
            "iterations, DVAR over those values): only the steps divisible by k are kept and replayed "
            "with the window in evaluations. Distance: |stop at evalEvery k - stop at every step|, in steps, "
            "over the series where both stop.",
            "",
            "| evalEvery | evaluated fraction | within 5 steps | median distance | largest distance |",
            "|---|---|---|---|---|",
        ]
        for r in summary["fixed_every"]:
            lines.append(f"| {r['eval_every']} | {r['evaluated_fraction']} | {r['within_5_steps']}/{r['count']} "
                         f"| {r['median_distance']} | {r['max_distance']} |")
    return "\n".join(lines) + "\n"


def markdown(report: dict) -> str:
    lines = [
        "# Tracking cost: the adaptive evaluation schedule",
        "",
        f"Tiny world, concept {report['concept']} ({IMAGES} images), batch 4, reference batch 4, DVAR window "
        f"{report['window']} steps, maxSteps {report['max_steps']}; {report['machine']}; {report['rounds']} interleaved "
        "rounds. Command: `python benchmarks/tracking_cost.py`. Loop ratio: total step time of the adaptive DVAR "
        "run over an untracked run (criterion none, no L_det) of the same steps; median (min-max) over rounds. "
        "Every step: the same for the every-step DVAR run (evalSchedule fixed, evalEvery 1, the spec's default) over "
        "the untracked run's steps, in the same rounds (the order rotates). Load average: at the end of the method.",
        "",
        "| method | stop, every step | stop, adaptive | moved | replay = live | evaluated steps | loop ratio adaptive "
        "| loop ratio every step | load average |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, r in report["methods"].items():
        q, e = r["loop_ratio_adaptive_over_untracked"], r["loop_ratio_every_step_over_untracked"]
        lines.append(
            f"| {method} | {r['stop_every_step']} | {r['stop_adaptive']} | {r['stop_moved']} | {r['replay_matches_live']} "
            f"| {r['adaptive_evaluations']}/{r['adaptive_steps']} | {q['median']:.3f} ({q['min']:.3f}-{q['max']:.3f}) "
            f"| {e['median']:.3f} ({e['min']:.3f}-{e['max']:.3f}) | {' '.join(str(x) for x in r['load_average'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--window", type=int, default=60)
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--methods", nargs="+", default=list(LEARNING_RATES))
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--recorded-only", action="store_true",
                        help="only the schedule on the personalization benchmark's recorded series")
    parser.add_argument("--runs", type=Path, default=RESULTS / "personalization_runs",
                        help="the personalization benchmark's run files to replay")
    parser.add_argument("--set", choices=(*CONCEPT_SETS, "all"), default="dev",
                        help="only the runs of these held-out concepts (the schedule is studied on dev)")
    args = parser.parse_args(argv)
    out = Path(args.output)
    concepts = {c.name for c in concept_set(args.set)}
    series = every_step_series(args.runs, concepts)  # read once: the frontier replays it 64 times
    summary = {"world": runs_world(args.runs), **recorded_series(series), "frontier": frontier(series),
               "fixed_every": fixed_every(series),
               "runs_dir": relative_to_repo(args.runs), "concept_set": args.set,
               "command": command_line("tracking_cost.py", argv)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "tracking_cost_recorded.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "tracking_cost_recorded.md").write_text(recorded_markdown(summary))
    print(recorded_markdown(summary))
    if args.recorded_only:
        return 0
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        concept_dir = Path(tmp) / "concept"
        write_concept_images(concept_by_name(CONCEPT), IMAGES, concept_dir, seed=0)
        report = {
            "world": installed_world(),
            "concept": CONCEPT,
            "window": args.window,
            "max_steps": args.max_steps,
            "rounds": args.rounds,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
            "methods": {},
        }
        for method in args.methods:  # the files are rewritten after each method: a cut-short run keeps whole methods
            report["methods"][method] = measure(method, concept_dir, args, Path(tmp))
            report["wall_seconds"] = round(time.monotonic() - started, 1)
            write_report(report, Path(args.output))
    print(markdown(report))
    return 0


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "tracking_cost.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "tracking_cost.md").write_text(markdown(report))


if __name__ == "__main__":
    sys.exit(main())
