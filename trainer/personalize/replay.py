"""`personalize-train replay`: where would a criterion have stopped on a recorded loss series?

Reads the `losses.csv` a run wrote (`step,train_loss,deterministic_loss,convergence_value`,
empty cells where the deterministic loss was not evaluated) or a JSON file (a list of numbers,
taken as evaluations at steps 1, 2, 3, ...; or a list of {"step": ..., "deterministic_loss": ...}
records), feeds the deterministic losses to the criterion exactly as the training loop does,
and prints one JSON object per criterion:

    {"criterion": "dvar", "window": 310, "window_evaluations": 62, "eval_every": 5,
     "threshold": 0.15, "min_steps": 0, "stop_step": 1234, "value": 0.149, "evaluations": 900}

Windows are given in training steps (as in the spec) and converted to evaluations with the
spacing of the series. `--eval-every K` replays a series recorded every step as if the loss had
been evaluated only at steps divisible by K (the loop's schedule), answering "what if I had
evaluated every K steps?". A series from the adaptive schedule (`--schedule adaptive`, chosen by
default when the gaps between evaluated steps differ) is fed to the criterion one value per
training step, interpolated between the evaluations exactly as the loop does
(eval_schedule.InterpolatedSeries), so the window is in steps and the stop step is the loop's.
The stop step assumes the loop checks the criterion after every
step: a criterion that is satisfied before `--min-steps` stops the run at `min_steps` if it is
still satisfied then.

When the run's `result.json` lies beside the file (a run's output folder), its criterion,
threshold, window, evalEvery and minSteps are the defaults, so that a plain replay answers where
that run's own criterion stopped; each flag overrides its one setting, `--no-result` ignores the
file. The output names the file it took them from (`defaults_from`).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any, NoReturn, Optional

from personalize.criteria import (
    CRITERIA,
    StopPolicy,
    _json_float,
    build_criterion,
    default_threshold,
    window_in_evaluations,
)
from personalize.eval_schedule import InterpolatedSeries
from personalize.run_files import RESULT_FILE
from personalize.spec import METHOD_DEFAULTS, EvalSchedule, Method

PROG = "personalize-train replay"
# Criteria that run on a loss series; by default replay compares those that can stop early.
REPLAYABLE = tuple(name for name, criterion in CRITERIA.items() if criterion.replayable)
DEFAULT_SET = tuple(name for name in REPLAYABLE if CRITERIA[name].stops_early)


class ReplayError(Exception):
    """A problem with the input, reported as one line and exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump), exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Replay a recorded deterministic-loss series through a criterion.")
    p.add_argument("file", metavar="FILE", help="losses.csv written by a run, or a JSON series")
    p.add_argument("--criterion", help=f"one of {', '.join(REPLAYABLE)} (default: each of {', '.join(DEFAULT_SET)})")
    p.add_argument("--window", type=int, help="window in training steps (default: the method's)")
    p.add_argument("--threshold", type=float, help="stop threshold (default: the criterion's/method's)")
    p.add_argument("--eval-every", type=int, help="keep only evaluations at steps divisible by K (fixed schedule)")
    p.add_argument(
        "--schedule",
        choices=[s.value for s in EvalSchedule],
        help="how the run evaluated: fixed (one criterion value per evaluation) or adaptive (one per step, "
        "interpolated between evaluations); default: adaptive when the gaps between evaluated steps differ",
    )
    p.add_argument("--min-steps", type=int, help="no stop before this step (default 0)")
    p.add_argument(
        "--method",
        default=Method.textual_inversion.value,
        choices=[m.value for m in Method],
        help="whose default window/threshold to use (default textualInversion)",
    )
    p.add_argument("--no-result", action="store_true",
                   help=f"ignore the {RESULT_FILE} beside FILE (by default the run's own settings are the defaults)")
    return p


# ---- reading -----------------------------------------------------------------------------------


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ReplayError(f"{what}: {text!r} is not a number") from None


def read_csv(path: Path, text: str) -> list[tuple[int, Optional[float]]]:
    reader = csv.DictReader(text.splitlines())
    columns = reader.fieldnames or []
    missing = [c for c in ("step", "deterministic_loss") if c not in columns]
    if missing:
        raise ReplayError(f"{path}: not a losses.csv: missing column(s) {', '.join(missing)} (header: {','.join(columns)})")
    points = []
    for line_no, row in enumerate(reader, start=2):
        if None in row:  # more cells than header columns
            raise ReplayError(f"{path} line {line_no}: more cells than the header has columns")
        step_text = (row.get("step") or "").strip()
        loss_text = (row.get("deterministic_loss") or "").strip()
        step = _number(step_text, f"{path} line {line_no} step")
        if not math.isfinite(step) or step != int(step):
            raise ReplayError(f"{path} line {line_no}: step {step_text!r} is not an integer")
        # An empty cell: the deterministic loss was not evaluated at this step.
        loss = _number(loss_text, f"{path} line {line_no} deterministic_loss") if loss_text else None
        points.append((int(step), loss))
    return points


def read_json(path: Path, text: str) -> list[tuple[int, Optional[float]]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ReplayError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(data, list):
        raise ReplayError(f"{path}: expected a JSON list of numbers or of {{step, deterministic_loss}} records")
    points = []
    for i, item in enumerate(data):
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            points.append((i + 1, float(item)))
        elif isinstance(item, dict):
            if "step" not in item:
                raise ReplayError(f"{path} item {i}: record has no 'step'")
            loss = item.get("deterministic_loss")
            step = item["step"]
            if not isinstance(step, int) or isinstance(step, bool):
                raise ReplayError(f"{path} item {i}: step {step!r} is not an integer")
            if loss is None or loss == "":
                points.append((step, None))  # not evaluated at this step
            else:
                points.append((step, _number(str(loss), f"{path} item {i} deterministic_loss")))
        else:
            raise ReplayError(f"{path} item {i}: expected a number or a record, got {type(item).__name__}")
    return points


def read_series(path: Path) -> tuple[list[tuple[int, float]], int]:
    """(step, deterministic loss) pairs where the loss was evaluated, and the last recorded step."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ReplayError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ReplayError(f"{path}: is a directory, not a file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ReplayError(f"{path}: cannot be read: {getattr(err, 'strerror', None) or err}") from None
    stripped = text.lstrip()
    rows = read_json(path, text) if stripped.startswith("[") else read_csv(path, text)
    for (a, _), (b, _) in zip(rows, rows[1:]):
        if b <= a:
            raise ReplayError(f"{path}: steps must increase, found {b} after {a}")
    points = [(step, loss) for step, loss in rows if loss is not None]
    if not points:
        raise ReplayError(f"{path}: no deterministic-loss values in the file")
    return points, rows[-1][0]


def recorded_settings(series_file: Path) -> tuple[Optional[Path], dict[str, Any]]:
    """The stop settings of the run whose result.json lies beside `series_file`: criterion,
    threshold, window (steps), eval_every and min_steps, each where the file says it, and the
    file's path; (None, {}) when there is none.

    The window in steps is `earlyStop.windowSteps`; a result.json without it (older runs) gives
    `earlyStop.window` evaluations x `reference.evalEvery`, which the criterion turns back into the
    same number of evaluations. For tiDreambooth they are the last stage's settings."""
    path = series_file.parent / RESULT_FILE
    if not path.is_file():
        return None, {}
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReplayError(f"{path} (the run's result, beside {series_file.name}) cannot be read: {err}; "
                          "pass --no-result to ignore it") from None
    early_stop = result.get("earlyStop") if isinstance(result, dict) else None
    if not isinstance(early_stop, dict):
        return path, {}
    reference = result.get("reference") or {}
    eval_every = reference.get("evalEvery")
    settings: dict[str, Any] = {
        "criterion": early_stop.get("criterion"),
        "threshold": early_stop.get("threshold"),
        "window": early_stop.get("windowSteps"),
        "eval_every": eval_every,
        "min_steps": early_stop.get("minSteps"),
    }
    if settings["window"] is None and early_stop.get("window") and eval_every:
        settings["window"] = int(early_stop["window"]) * int(eval_every)
    return path, {k: v for k, v in settings.items() if v is not None}


# ---- replaying ---------------------------------------------------------------------------------


def recorded_spacing(points: list[tuple[int, float]]) -> int:
    """The usual distance between evaluated steps (1 for a single point)."""
    gaps = Counter(b - a for (a, _), (b, _) in zip(points, points[1:]))
    return gaps.most_common(1)[0][0] if gaps else 1


def subsample(points: list[tuple[int, float]], eval_every: int, spacing: int) -> list[tuple[int, float]]:
    if eval_every % spacing:
        raise ReplayError(
            f"--eval-every {eval_every} is not a multiple of the series' evaluation spacing ({spacing} steps)"
        )
    kept = [(s, v) for s, v in points if s % eval_every == 0]
    if not kept:
        raise ReplayError(f"no evaluation falls on a step divisible by {eval_every}")
    return kept


def recorded_schedule(points: list[tuple[int, float]]) -> EvalSchedule:
    """adaptive when the evaluated steps are not evenly spaced, else fixed."""
    gaps = {b - a for (a, _), (b, _) in zip(points, points[1:])}
    return EvalSchedule.adaptive if len(gaps) > 1 else EvalSchedule.fixed


def stop_step(
    points: list[tuple[int, float]], policy: StopPolicy, last_step: int,
    schedule: EvalSchedule = EvalSchedule.fixed,
) -> tuple[Optional[int], Optional[float]]:
    """First step at which the loop (checking after every step) would stop, and the value then.

    The criterion's state changes only at evaluations; between two evaluations at steps e and
    e_next the loop sees the same answer, so it stops at max(e, min_steps) if that is < e_next.
    """
    value: Optional[float] = None
    series = InterpolatedSeries() if schedule == EvalSchedule.adaptive else None
    for i, (step, loss) in enumerate(points):
        new = policy.update(loss) if series is None else series.observe(policy, step, loss)
        if new is not None:
            value = new
        if policy.criterion.should_stop():
            next_step = points[i + 1][0] if i + 1 < len(points) else last_step + 1
            candidate = max(step, policy.min_steps)
            if candidate < next_step:
                return candidate, value
    return None, value


def replay_one(
    name: str,
    points: list[tuple[int, float]],
    *,
    window_steps: int,
    threshold: Optional[float],
    eval_every: int,
    min_steps: int,
    method: Method,
    last_step: int,
    schedule: EvalSchedule = EvalSchedule.fixed,
) -> dict[str, Any]:
    spacing = 1 if schedule == EvalSchedule.adaptive else eval_every  # steps per criterion value
    window_evals = window_in_evaluations(window_steps, spacing)
    if threshold is None:
        threshold = default_threshold(name, METHOD_DEFAULTS[method].threshold)
    criterion = build_criterion(name, window_steps, spacing, threshold)
    # max_steps is irrelevant to "where would the criterion stop": set it beyond the series.
    policy = StopPolicy(criterion, max_steps=max(last_step, min_steps) + 1, min_steps=min_steps)
    step, value = stop_step(points, policy, last_step, schedule)
    return {
        "criterion": name,
        "schedule": schedule.value,
        "window": window_steps,
        "window_evaluations": window_evals,
        "eval_every": eval_every if schedule == EvalSchedule.fixed else None,  # adaptive: uneven gaps
        "threshold": threshold,
        "min_steps": min_steps,
        "stop_step": step,
        "value": _json_float(value),
        "evaluations": len(points),
        "ignored_nonfinite": criterion.nonfinite,
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.criterion is not None and args.criterion not in REPLAYABLE:
        hint = f" ({args.criterion} needs scores of samples, not a loss series)" if args.criterion in CRITERIA else ""
        raise ReplayError(f"unknown criterion {args.criterion!r}{hint}; choose one of {', '.join(REPLAYABLE)}")
    if args.window is not None and args.window < 1:
        raise ReplayError(f"--window must be >= 1 step, got {args.window}")
    if args.threshold is not None and not (math.isfinite(args.threshold) and args.threshold > 0):
        raise ReplayError(f"--threshold must be a positive number, got {args.threshold}")
    if args.eval_every is not None and args.eval_every < 1:
        raise ReplayError(f"--eval-every must be >= 1, got {args.eval_every}")
    if args.min_steps is not None and args.min_steps < 0:
        raise ReplayError(f"--min-steps must be >= 0, got {args.min_steps}")

    points, last_step = read_series(Path(args.file))
    source, recorded = (None, {}) if getattr(args, "no_result", False) else recorded_settings(Path(args.file))
    spacing = recorded_spacing(points)
    chosen = getattr(args, "schedule", None)
    schedule = EvalSchedule(chosen) if chosen else recorded_schedule(points)
    if args.eval_every is not None and schedule == EvalSchedule.adaptive:
        raise ReplayError("--eval-every subsamples a fixed schedule; it cannot be combined with an adaptive one")
    eval_every = args.eval_every
    run_eval_every = recorded.get("eval_every", spacing)
    if eval_every is None and schedule == EvalSchedule.fixed and run_eval_every > spacing and run_eval_every % spacing == 0:
        eval_every = run_eval_every  # a series denser than the run's schedule: replay what the run saw
    if eval_every is not None:
        points = subsample(points, eval_every, spacing)
        spacing = eval_every
    method = Method(args.method)
    window_steps = next(w for w in (args.window, recorded.get("window"), METHOD_DEFAULTS[method].window) if w is not None)
    min_steps = next(m for m in (args.min_steps, recorded.get("min_steps"), 0) if m is not None)
    run_criterion = recorded.get("criterion")
    if args.criterion:
        names = [args.criterion]
    elif run_criterion in REPLAYABLE:
        names = [run_criterion]
    else:  # the run's criterion needs samples (clip) or none was recorded: compare those that can stop
        names = list(DEFAULT_SET)
    results = []
    for name in names:
        # the run's threshold belongs to its own criterion; another one keeps its default
        threshold = args.threshold if args.threshold is not None else (
            recorded.get("threshold") if name == run_criterion else None)
        result = replay_one(
            name,
            points,
            window_steps=window_steps,
            threshold=threshold,
            eval_every=spacing,
            min_steps=min_steps,
            method=method,
            last_step=last_step,
            schedule=schedule,
        )
        result["defaults_from"] = str(source) if source is not None else None
        results.append(result)
    return results


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results = run(args)
    except ReplayError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    for result in results:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
