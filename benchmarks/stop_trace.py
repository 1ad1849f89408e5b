"""One run's stop, traced: how far L_det and CLIP-I had come when DVAR stopped.

    python benchmarks/stop_trace.py --set dev      # every dev baseline: the summary table
    python benchmarks/stop_trace.py --runs benchmarks/results/personalization_runs \\
        textualInversion/red_striped_triangle lora/blue_dotted_star   # these, step by step

For a baseline that observed DVAR (L_det and DVAR's value at every step) and scored a CLIP-I
curve, per scored step: L_det (the mean of the SMOOTH steps ending there: one step's value carries
the step-to-step wiggle DVAR measures), DVAR's value, and the CLIP-I gain as a share of the
plateau's gain. Both ends are plateaus, since single values wobble: L_det's is the mean of the
run's last quarter, CLIP-I's the mean of the curve's last PLATEAU_POINTS scores (as the
benchmark's "gain kept against the plateau"). The summary puts side by side, at DVAR's stop:

- L_det progress: (L_det at step 1 - L_det at the stop) / (L_det at step 1 - L_det's plateau);
- CLIP-I progress: the gain at the stop (read off the curve, stop_sweep.gain_at) / the plateau gain;
- CLIP-I wobble: the standard deviation of the plateau's scores / the plateau gain. A shortfall in
  CLIP-I progress far larger than the wobble is a real early stop, not score noise.

DVAR stops when L_det has flattened, so its L_det progress is high; when CLIP-I progress is far
lower, the concept is a late learner for this method: the deterministic loss had stopped telling
what the samples still gained.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Optional

from personalize.world.shapes import CONCEPT_SETS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from personalization import METHODS, PLATEAU_POINTS  # noqa: E402  (sibling script modules)
from recorded_runs import find_run, read_run, relative_to_repo, write_study  # noqa: E402
from stop_quality import MIN_JUDGED_GAIN, s90  # noqa: E402
from stop_sweep import curve_gains, gain_at  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SMOOTH = 10


def smoothed(losses: list[float], step: int, width: int = SMOOTH) -> float:
    """Mean L_det of the `width` steps ending at `step` (1-based), fewer at the start."""
    return statistics.fmean(losses[max(0, step - width) : step])


def trace(run: dict, base_clip_i: float) -> dict:
    """The trace of one baseline run record (it observed DVAR and scored a CLIP-I curve)."""
    series = run["series"]
    losses = series["deterministic_loss"]
    values = dict(zip(series["convergence_steps"], series["convergence_value"]))
    steps, gains = curve_gains(series, base_clip_i)
    stop = run["dvar_stop"]["steps"]
    plateau = statistics.fmean(gains[-PLATEAU_POINTS:])
    wobble = statistics.pstdev(gains[-PLATEAU_POINTS:]) / plateau if plateau > 0 else None  # no gain to wobble around
    start, end = losses[0], statistics.fmean(losses[-(len(losses) // 4):])

    def l_det_progress(step: int) -> float:
        return (start - smoothed(losses, step)) / (start - end)

    rows = [{"step": s, "l_det": round(smoothed(losses, s), 5), "dvar_value": values.get(s),
             "clip_i_progress": round(g / plateau, 3)} for s, g in zip(steps[1:], gains[1:])]
    return {
        "method": run["method"], "concept": run["concept"], "window": run["window"], "threshold": run["threshold"],
        "final_gain": round(gains[-1], 4), "plateau_gain": round(plateau, 4), "dvar_stop": stop,
        "s90": s90(steps, gains, min_gain=0.0),
        "l_det_progress_at_stop": round(l_det_progress(stop), 3),
        "clip_i_progress_at_stop": round(gain_at(stop, steps, gains) / plateau, 3),
        "clip_i_wobble": None if wobble is None else round(wobble, 3),
        "rows": rows,
    }


def markdown(t: dict) -> str:
    lines = [f"### {t['method']} / {t['concept']} (window {t['window']}, threshold {t['threshold']})", "",
             f"CLIP-I gain: final {t['final_gain']:.3f}, plateau {t['plateau_gain']:.3f}; DVAR stops at "
             f"{t['dvar_stop']}, s90 {t['s90']} (of the final gain). "
             f"At the stop: L_det progress {t['l_det_progress_at_stop']:.0%}, "
             f"CLIP-I progress {t['clip_i_progress_at_stop']:.0%}.", "",
             f"| step | L_det (mean of {SMOOTH} steps) | DVAR value | CLIP-I gain / plateau |", "|---|---|---|---|"]
    for r in t["rows"]:
        value = "-" if r["dvar_value"] is None else f"{r['dvar_value']:.3f}"
        lines.append(f"| {r['step']} | {r['l_det']:.4f} | {value} | {r['clip_i_progress']:.0%} |")
    return "\n".join(lines) + "\n"


def summary_table(traces: list[dict]) -> str:
    lines = ["| method | concept | plateau gain | DVAR stop | s90 | L_det progress at the stop | "
             "CLIP-I progress at the stop | CLIP-I wobble / plateau gain |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {t['method']} | {t['concept']} | {t['plateau_gain']:.3f} | {t['dvar_stop']} | {t['s90']} | "
              f"{t['l_det_progress_at_stop']:.0%} | {t['clip_i_progress_at_stop']:.0%} | "
              f"{'-' if t['clip_i_wobble'] is None else format(t['clip_i_wobble'], '.0%')} |"
              for t in traces]
    return "\n".join(lines) + "\n"


def method_medians(traces: list[dict]) -> dict[str, dict]:
    """Per method, over its concepts whose plateau gain is at least MIN_JUDGED_GAIN (a smaller one
    is within the scores' wobble, and progress against it means nothing): the median L_det and
    CLIP-I progress at the stop and the median wobble."""
    out = {}
    for method in dict.fromkeys(t["method"] for t in traces):
        gained = [t for t in traces if t["method"] == method and t["plateau_gain"] >= MIN_JUDGED_GAIN]
        if gained:
            out[method] = {"concepts": len(gained), **{
                key: round(statistics.median(t[key] for t in gained), 3)
                for key in ("l_det_progress_at_stop", "clip_i_progress_at_stop", "clip_i_wobble")}}
    return out


def medians_table(medians: dict[str, dict]) -> str:
    lines = [f"| method | concepts (plateau gain >= {MIN_JUDGED_GAIN}) | median L_det progress at the stop | "
             "median CLIP-I progress at the stop | median CLIP-I wobble / plateau gain |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {v['concepts']} | {v['l_det_progress_at_stop']:.0%} | {v['clip_i_progress_at_stop']:.0%} | "
              f"{v['clip_i_wobble']:.0%} |" for m, v in medians.items()]
    return "\n".join(lines) + "\n"


def load_trace(runs: Path, method: str, concept: str) -> dict:
    """The trace of `method`'s baseline on `concept` in `runs`; ValueError saying why it cannot be traced."""
    path, base = find_run(runs, f"{method}_baseline_{concept}"), find_run(runs, f"base_{concept}")
    if path is None or base is None:
        raise ValueError(f"needs {method}_baseline_{concept}.json and base_{concept}.json in {runs}")
    run = read_run(path)
    if not (run["series"].get("curve_steps") and "dvar_stop" in run):
        raise ValueError(f"{path.name} is not a baseline that observed DVAR and scored a CLIP-I curve")
    return trace(run, read_run(base)["clip_i"])


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_named", nargs="*", metavar="METHOD/CONCEPT",
                        help="runs to trace step by step (default: every traceable baseline of --set, summary only)")
    parser.add_argument("--set", choices=sorted(CONCEPT_SETS), default="dev")
    parser.add_argument("--runs", type=Path, default=RESULTS / "personalization_runs")
    parser.add_argument("--out", type=Path, default=None, help="write stop_trace_<set>.{json,md} here (default: --runs' parent)")
    args = parser.parse_args(argv)
    traces = []
    if args.runs_named:
        for name in args.runs_named:
            method, _, concept = name.partition("/")
            try:
                traces.append(load_trace(args.runs, method, concept))
            except ValueError as why:
                print(f"error: {name}: {why}", file=sys.stderr)
                return 2
    else:  # every baseline of the set that can be traced
        for method in METHODS:
            for concept in CONCEPT_SETS[args.set]:
                try:
                    traces.append(load_trace(args.runs, method, concept.name))
                except ValueError:
                    continue
    if not traces:
        print(f"error: no baseline in {args.runs} observed DVAR and scored a CLIP-I curve", file=sys.stderr)
        return 2
    command = " ".join(["python benchmarks/stop_trace.py", "--set", args.set, "--runs", relative_to_repo(args.runs),
                        *args.runs_named])
    medians = method_medians(traces)
    parts = ["# DVAR's stop against L_det and CLIP-I progress", "", f"Command: `{command}`", "",
             medians_table(medians), summary_table(traces)]
    if args.runs_named:
        parts += [markdown(t) for t in traces]
    write_study(args.out or args.runs.parent, f"stop_trace_{args.set}", {"medians": medians, "traces": traces}, parts,
                args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
