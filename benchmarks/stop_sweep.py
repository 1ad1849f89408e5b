"""Where would DVAR stop with another window or threshold, and what would that stop keep?

    python benchmarks/stop_sweep.py --set dev [--runs benchmarks/results/personalization_runs]

Reads the personalization benchmark's baseline runs that observed DVAR (L_det at every step of
the whole budget, CLIP-I every --curve-every steps) and, per method and (window, threshold):

- replays DVAR on the recorded L_det series (`personalize-train replay`'s code), once per
  --min-steps floor (no stop before it; default 0) -> stop step;
- reads the CLIP-I gain at that step off the baseline's curve, linearly interpolated between
  its scored steps (the base model's score at step 0): an estimate, exact only on scored steps;
- gain kept = that gain / the baseline's final gain, per concept; median and minimum over the
  concepts whose final gain is at least MIN_JUDGED_GAIN (stop_quality.py); steps / budget, median;
  whether that meets the stop's target (stop_quality.meets_target).

It also reports how noisy the curve is: the standard deviation of the curve's last quarter around
its mean, as a share of the final gain. A single final score carries that noise into every "gain
kept", so a stop on the plateau can read as 80% or 110% by chance.

No training: seconds per sweep. Written for the dev set (tuning allowed); on the test set it is
only ever run after the settings are fixed, to report.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Optional

from personalize.world.shapes import CONCEPT_SETS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recorded_runs import RESULTS, command_line, every_step_runs, every_step_stop, find_run, read_run, study_parser, write_study  # noqa: E402  (sibling script modules)
from stop_quality import MIN_JUDGED_GAIN, meets_target  # noqa: E402

WINDOWS = (40, 60, 80, 100, 120)
THRESHOLDS = (0.1, 0.15, 0.2, 0.3, 0.4)


def gain_at(step: float, steps: list[int], gains: list[float]) -> float:
    """The curve's gain at `step`, linearly interpolated between scored steps."""
    if step >= steps[-1]:
        return gains[-1]
    for (s0, g0), (s1, g1) in zip(zip(steps, gains), zip(steps[1:], gains[1:])):
        if s0 <= step <= s1:
            return g0 + (g1 - g0) * (step - s0) / (s1 - s0)
    raise ValueError(f"step {step} before the curve's first point {steps[0]}")


def curve_gains(series: dict, base_clip_i: float) -> tuple[list[int], list[float]]:
    """A baseline's CLIP-I curve as (steps, gains over the base model), starting at step 0, gain 0."""
    return [0] + series["curve_steps"], [0.0] + [v - base_clip_i for v in series["curve_clip_i"]]


def load_baselines(runs_dir: Path, method: str, concepts: list[str]) -> dict[str, dict]:
    """concept -> {"losses", "budget", "steps", "gains", "window", "threshold"} for baselines that
    observed DVAR and scored a CLIP-I curve."""
    out = {}
    for run in every_step_runs(runs_dir, method=method, concepts=concepts, variants=("baseline",)):
        base_path = find_run(runs_dir, f"base_{run['concept']}")
        if base_path is None or not run["series"].get("curve_steps"):
            continue
        steps, gains = curve_gains(run["series"], read_run(base_path)["clip_i"])
        out[run["concept"]] = {"losses": run["series"]["deterministic_loss"], "budget": run["steps"],
                               "steps": steps, "gains": gains,
                               "window": run.get("window"), "threshold": run.get("threshold")}  # the run's DVAR
    return out


def plateau_spread(gains: list[float]) -> float:
    """Standard deviation of the curve's last quarter (at least 3 points): its plateau's wobble."""
    return statistics.pstdev(gains[-max(3, len(gains) // 4):])


def curve_noise(gains: list[float]) -> float:
    """The plateau's wobble over the final gain."""
    return plateau_spread(gains) / gains[-1] if gains[-1] > 0 else math.nan


def stop_outcome(method: str, losses: list[float], window: int, threshold: float,
                 baseline: dict, min_steps: int = 0) -> tuple[float, Optional[float]]:
    """DVAR(window, threshold) replayed on `losses` against one recorded baseline: (steps / budget,
    gain kept), the gain kept None when the concept is not judged (final gain under MIN_JUDGED_GAIN:
    within the curve's wobble). A run that never stops runs the budget."""
    stop = every_step_stop(losses, window, threshold, method, min_steps) or baseline["budget"]
    final = baseline["gains"][-1]
    kept = gain_at(stop, baseline["steps"], baseline["gains"]) / final if final >= MIN_JUDGED_GAIN else None
    return stop / baseline["budget"], kept


def summarize(outcomes: list[tuple[float, Optional[float]]]) -> dict:
    """Over concepts' stop outcomes: gain kept on the median and the worst judged concept, median
    steps / budget, and whether that meets the stop's target (stop_quality.meets_target)."""
    kept = [k for _, k in outcomes if k is not None]
    summary = {
        "median_kept": statistics.median(kept) if kept else math.nan,
        "min_kept": min(kept) if kept else math.nan,
        "median_steps_ratio": statistics.median(ratio for ratio, _ in outcomes),
        "kept_per_concept": [round(k, 3) for k in kept],
    }
    summary["meets_target"] = meets_target(summary["median_kept"], summary["min_kept"], summary["median_steps_ratio"])
    return summary


def sweep(method: str, baselines: dict[str, dict], windows, thresholds, min_steps=(0,)) -> list[dict]:
    return [{"window": window, "threshold": threshold, "min_steps": floor,
             **summarize([stop_outcome(method, b["losses"], window, threshold, b, floor) for b in baselines.values()])}
            for window in windows for threshold in thresholds for floor in min_steps]


def markdown(method: str, baselines: dict, rows: list[dict]) -> str:
    noise = [curve_noise(b["gains"]) for b in baselines.values()]
    finite = [n for n in noise if math.isfinite(n)]
    spread = statistics.median(plateau_spread(b["gains"]) for b in baselines.values())
    lines = [
        f"### {method} ({len(baselines)} concepts)",
        "",
        f"Plateau wobble (std of the curve's last quarter), median over concepts: {spread:.3f} CLIP-I; "
        + (f"as a share of the final gain: {statistics.median(finite):.0%}" if finite else "no concept gained"),
        "",
        "| window | threshold | minSteps | gain kept, median | gain kept, min | steps / budget, median | meets the target |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['window']} | {r['threshold']} | {r['min_steps']} | {r['median_kept']:.0%} | {r['min_kept']:.0%} | "
                     f"{r['median_steps_ratio']:.2f} | {'yes' if r['meets_target'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = study_parser(__doc__)
    parser.add_argument("--min-steps", default="0", metavar="N,...",
                        help="minSteps floors to sweep too (no stop before that step)")
    parser.add_argument("--stem", default=None, help="output name (default: stop_sweep_<set>)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    floors = [int(n) for n in args.min_steps.split(",")]
    concepts = [c.name for c in CONCEPT_SETS[args.set]]
    report, parts = {}, [f"# DVAR window / threshold sweep on recorded baselines ({args.set} concepts)", "",
                         f"Command: `{command_line('stop_sweep.py', argv)}`. Gain kept is read off "
                         "the baseline's CLIP-I curve (interpolated between scored steps): an estimate.", ""]
    for method in args.methods.split(","):
        baselines = load_baselines(args.runs, method, concepts)
        if not baselines:
            continue
        rows = sweep(method, baselines, WINDOWS, THRESHOLDS, floors)
        report[method] = {"concepts": sorted(baselines), "rows": rows,
                          "plateau_spread": {c: plateau_spread(b["gains"]) for c, b in baselines.items()},
                          "curve_noise": {c: curve_noise(b["gains"]) for c, b in baselines.items()}}
        parts.append(markdown(method, baselines, rows))
    if not report:
        print(f"error: no baseline runs with L_det series and curves in {args.runs}", file=sys.stderr)
        return 2
    write_study(args.out, args.stem or f"stop_sweep_{args.set}", report, parts, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
