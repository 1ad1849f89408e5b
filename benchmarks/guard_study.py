"""Would a CLIP guard on top of DVAR keep the late learners? Replayed on recorded baselines.

    python benchmarks/guard_study.py --set fresh --runs benchmarks/results/fresh/personalization_runs

The guard: DVAR's stop is accepted only once the `clip` criterion (the paper's baseline:
`patience` checks in a row without a CLIP-I gain over the best so far) has fired too, so the run
stops at the later of the two. Both are replayed on the personalization benchmark's baselines: DVAR
(the run's own window and threshold) on the recorded L_det series, the CLIP criterion on the
baseline's CLIP-I curve (its scored steps are the checks: every --curve-every steps, 8 samples).
The gain kept at the stop is read off that curve (stop_sweep.py), against the same target.

What it costs is counted, not timed: the CLIP checks made up to the stop (each generates and
scores the samples), on top of L_det at every step. No training: seconds per set.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Optional

from personalize.criteria import ClipScoreCriterion
from personalize.world.shapes import CONCEPT_SETS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recorded_runs import RESULTS, command_line, every_step_stop, study_parser, write_study  # noqa: E402  (sibling script modules)
from stop_quality import MIN_JUDGED_GAIN  # noqa: E402
from stop_sweep import gain_at, load_baselines, summarize  # noqa: E402


def clip_stop(steps: list[int], gains: list[float], patience: int) -> Optional[int]:
    """Where the `clip` criterion (epsilon 0) stops on a curve whose scored steps are its checks
    (steps[0] = 0 is the base model, not a check)."""
    criterion = ClipScoreCriterion(patience=patience, epsilon=0.0, every_steps=steps[1] - steps[0])
    for step, gain in zip(steps[1:], gains[1:]):
        criterion.update(gain)
        if criterion.should_stop():
            return step
    return None


def dvar_stop(method: str, baseline: dict) -> int:
    """Where DVAR (the run's own window and threshold) stops on the recorded L_det; the budget if never."""
    return every_step_stop(baseline["losses"], baseline["window"], baseline["threshold"], method) or baseline["budget"]


def guarded_outcome(baseline: dict, dvar: int, patience: Optional[int]) -> dict:
    """DVAR's stop `dvar` alone (patience None) or held until the CLIP criterion fires, on one baseline."""
    budget, steps, gains = baseline["budget"], baseline["steps"], baseline["gains"]
    stop = dvar if patience is None else max(dvar, clip_stop(steps, gains, patience) or budget)
    final = gains[-1]
    return {"stop": stop, "steps_ratio": stop / budget,
            "kept": gain_at(stop, steps, gains) / final if final >= MIN_JUDGED_GAIN else None,
            "clip_checks": sum(1 for s in steps[1:] if s <= stop) if patience is not None else 0}


def study(method: str, baselines: dict[str, dict], patiences: list[Optional[int]]) -> list[dict]:
    stops = [(b, dvar_stop(method, b)) for b in baselines.values()]  # DVAR's stop does not depend on the guard
    rows = []
    for patience in patiences:
        outcomes = [guarded_outcome(b, dvar, patience) for b, dvar in stops]
        rows.append({"patience": patience, **summarize([(o["steps_ratio"], o["kept"]) for o in outcomes]),
                     "median_clip_checks": statistics.median(o["clip_checks"] for o in outcomes)})
    return rows


def markdown(method: str, baselines: dict, rows: list[dict]) -> str:
    first = next(iter(baselines.values()))
    lines = [f"### {method} ({len(baselines)} concepts; DVAR window {first['window']}, threshold {first['threshold']})", "",
             "| stop | gain kept, median | gain kept, worst | steps / budget, median | CLIP checks, median | meets the target |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        name = "DVAR alone" if r["patience"] is None else f"DVAR + CLIP guard, patience {r['patience']}"
        lines.append(f"| {name} | {r['median_kept']:.0%} | {r['min_kept']:.0%} | {r['median_steps_ratio']:.2f} "
                     f"| {r['median_clip_checks']:g} | {'yes' if r['meets_target'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = study_parser(__doc__)
    parser.add_argument("--patience", default="2,3", metavar="N,...", help="the guard's patiences, in checks")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    patiences = [None] + [int(n) for n in args.patience.split(",")]
    concepts = [c.name for c in CONCEPT_SETS[args.set]]
    report, parts = {}, [f"# A CLIP guard on top of DVAR, on recorded baselines ({args.set} concepts)", "",
                         f"Command: `{command_line('guard_study.py', argv)}`. "
                         "Gain kept is read off the baseline's CLIP-I curve (interpolated between scored steps): an "
                         "estimate; the guard's checks are that curve's scored steps.", ""]
    for method in args.methods.split(","):
        baselines = load_baselines(args.runs, method, concepts)
        if not baselines:
            continue
        rows = study(method, baselines, patiences)
        report[method] = {"concepts": sorted(baselines), "rows": rows}
        parts.append(markdown(method, baselines, rows))
    if not report:
        print(f"error: no baseline runs with L_det series and curves in {args.runs}", file=sys.stderr)
        return 2
    write_study(args.out, f"guard_study_{args.set}", report, parts, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
