"""How the reference batch's size and timesteps move the DVAR stop, without retraining.

    python benchmarks/personalization.py --set dev --methods lora --variants baseline,dvar \\
        --setting lora.slot_study=8 --curve-every 0 --out benchmarks/results/experiments/reference_batch
    python benchmarks/reference_study.py --set dev --study benchmarks/results/experiments/reference_batch

The first command re-runs the dev baselines (same seed: the same training) and scores a second
reference batch of 8 slots slot by slot at every step. L_det of a reference batch is the mean of
its slots' losses, so any k of those 8 slots is a reference batch of size k with its own fixed
images, noise, captions and timesteps. Per method and size k this script takes every k-subset,
replays DVAR (the method's window and threshold, `personalize-train replay`'s code) on its L_det
series, and reads the CLIP-I gain at that stop off the baseline's curve (stop_sweep.py: the
recorded baselines of --runs, interpolated between scored steps).

Per k it reports, over the subsets: the median of "gain kept on the median concept", the median
of "worst judged concept", the median steps / budget, and how many subsets meet the target
(stop_quality.meets_target). Per single slot (k = 1) it reports the same by the slot's timestep.
What an evaluation of k slots costs is measured by the benchmark's timing pairs
(`--setting METHOD.reference_batch_size=k`; docs/benchmark.md, "Tracking cost against the
reference batch size"): not k/4 of the default's, since a single slot still costs about 0.2 of a
training step on this CPU.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Optional

from personalize.world.shapes import CONCEPT_SETS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recorded_runs import command_line, find_run, read_run, study_parser, write_study  # noqa: E402  (sibling script modules)
from stop_sweep import load_baselines, stop_outcome, summarize  # noqa: E402

SIZES = (1, 2, 4, 8)


def same_training(losses: list[float], recorded: list[float], start: int = 20) -> bool:
    """Whether a study run's own L_det series is the recorded baseline's training: the same length,
    the first `start` values within 0.1% relative, and the rest within 1%. On one machine the two
    are equal; another CPU's kernels differ in the last bits, which full fine-tuning lets grow to
    0.015% by step 20 and 0.5% by step 400 (DreamBooth, measured), while another seed or setting
    differs by percents from the first steps."""
    return len(losses) == len(recorded) and all(
        math.isclose(a, b, rel_tol=1e-3 if step < start else 1e-2, abs_tol=1e-6)
        for step, (a, b) in enumerate(zip(losses, recorded)))


def load_study(study_runs: Path, method: str, baselines: dict[str, dict]) -> dict[str, dict]:
    """concept -> {"timesteps", "losses" [steps][slots], "window", "threshold"} for study runs whose
    training is the recorded baseline's (`same_training`)."""
    out = {}
    for concept, baseline in baselines.items():
        path = find_run(study_runs, f"{method}_baseline_{concept}")
        if path is None:
            continue
        run = read_run(path)
        if "slots" not in run:
            continue
        if not same_training(run["series"].get("deterministic_loss") or [], baseline["losses"]):
            print(f"warning: {path.name}: its L_det differs from the recorded baseline's (not the same "
                  "training); left out", file=sys.stderr)
            continue
        out[concept] = {"timesteps": run["slots"]["timesteps"], "losses": run["slots"]["losses"],
                        "window": run["window"], "threshold": run["threshold"]}
    return out


def subset_outcome(method: str, subset: tuple[int, ...], study: dict, baselines: dict) -> dict:
    """DVAR on the mean loss of `subset`'s slots, per concept, summarized over the concepts."""
    outcomes = []
    for concept, s in study.items():
        losses = [statistics.fmean(row[i] for i in subset) for row in s["losses"]]
        outcomes.append(stop_outcome(method, losses, s["window"], s["threshold"], baselines[concept]))
    return summarize(outcomes)


def study_method(method: str, study: dict, baselines: dict) -> dict:
    # the same seed draws the same slots for every concept: one list of timesteps
    timesteps = next(iter(study.values()))["timesteps"]
    n_slots = len(timesteps)
    by_size = {}
    for k in (k for k in SIZES if k <= n_slots):
        outcomes = [subset_outcome(method, subset, study, baselines) for subset in itertools.combinations(range(n_slots), k)]
        by_size[k] = {
            "subsets": len(outcomes),
            "median_kept": statistics.median(o["median_kept"] for o in outcomes),
            "min_kept": statistics.median(o["min_kept"] for o in outcomes),
            "steps": statistics.median(o["median_steps_ratio"] for o in outcomes),
            "meeting_target": sum(o["meets_target"] for o in outcomes),
        }
    by_slot = []
    for i in range(n_slots):
        outcome = subset_outcome(method, (i,), study, baselines)
        by_slot.append({"timestep": timesteps[i], "median_kept": outcome["median_kept"],
                        "min_kept": outcome["min_kept"], "steps": outcome["median_steps_ratio"]})
    return {"concepts": sorted(study), "by_size": by_size, "by_slot": sorted(by_slot, key=lambda r: r["timestep"])}


def markdown(method: str, result: dict) -> str:
    lines = [f"### {method} ({len(result['concepts'])} concepts)", "",
             "| slots k | subsets | gain kept, median concept | worst judged concept | steps / budget | subsets meeting the target |",
             "|---|---|---|---|---|---|"]
    for k, r in result["by_size"].items():
        lines.append(f"| {k} | {r['subsets']} | {r['median_kept']:.0%} | {r['min_kept']:.0%} | {r['steps']:.2f} "
                     f"| {r['meeting_target']} / {r['subsets']} |")
    lines += ["", "| one slot, timestep | gain kept, median concept | worst judged concept | steps / budget |", "|---|---|---|---|"]
    lines += [f"| {r['timestep']} | {r['median_kept']:.0%} | {r['min_kept']:.0%} | {r['steps']:.2f} |" for r in result["by_slot"]]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = study_parser(__doc__)  # --runs: the recorded baselines the study runs repeat
    parser.add_argument("--study", type=Path, required=True, help="the slot-study benchmark's results folder")
    args = parser.parse_args(argv)
    concepts = [c.name for c in CONCEPT_SETS[args.set]]
    report, parts = {}, [f"# Reference batch: size and timesteps ({args.set} concepts)", "",
                         f"Command: `{command_line('reference_study.py', argv)}`. "
                         "Gain kept is read off the baseline's CLIP-I curve: an estimate.", ""]
    for method in args.methods.split(","):
        baselines = load_baselines(args.runs, method, concepts)
        study = load_study(args.study / "personalization_runs", method, baselines)
        if not study:
            continue
        report[method] = study_method(method, study, baselines)
        parts.append(markdown(method, report[method]))
    if not report:
        print(f"error: no slot-study runs matching recorded baselines in {args.study}", file=sys.stderr)
        return 2
    write_study(args.study, f"reference_study_{args.set}", report, parts, args.study / "personalization_runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
