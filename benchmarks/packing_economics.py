"""CPU-seconds per concept on the tiny world's dev set: solo or packed, fixed budget or stopped.

    python benchmarks/packing_economics.py [--methods textualInversion,lora]

A model, not a run: each case's recorded steps per concept times a measured cost per step.

- Steps per concept: (a) the fixed budget (maxSteps); (b) and (c) the dev set's recorded DVAR
  runs (personalization_dev.json); (d) the cheapest setting that the stop studies
  (stop_sweep_dev_min_steps.json, guard_study_dev.json) record as keeping >= TARGET_MIN_KEPT of
  the worst judged concept's gain, its stops replayed on the recorded baselines (the studies' own
  code).
- Cost per concept: setup and outputs + steps x cost per concept-step, from packing.json's
  pack-of-PACK_SIZE row, solo for (a) and (b), packed for (c) and (d): a pack that is refilled as
  slots leave stays full. Where the row splits off the time in training steps (solo/packTrainingSeconds),
  the rest is setup and outputs, paid once per concept (a pack's load spread over its PACK_SIZE slots:
  with refill it is spread wider, so this overstates (c) and (d) a little); otherwise the whole
  time is spread over the benchmark's steps per concept and setup folds into the per-step cost.
  The packing benchmark trains with criterion none, so tracking is added as step_timing.json's
  evaluation share of a training step; in a pack it is assumed to pack as well as training (all
  slots' reference batches go through one forward) and is also reported at its solo cost.
- A CLIP guard's checks (num samples x inference steps each, solo) are priced from the recorded
  base-model evaluations: an upper bound, those also load the pipeline.

At one torch thread, wall seconds are CPU-seconds.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Optional

from personalize.world.shapes import CONCEPT_SETS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guard_study import dvar_stop, guarded_outcome  # noqa: E402  (sibling script modules)
from recorded_runs import RESULTS, find_run, read_run, STUDIED_METHODS, command_line, every_step_stop, relative_to_repo, study_parser, write_study  # noqa: E402
from stop_quality import TARGET_MIN_KEPT  # noqa: E402
from stop_sweep import load_baselines  # noqa: E402

PACK_SIZE = 8


def measured_costs(packing: dict, method: str) -> dict:
    """Seconds per concept-step and per concept (setup and outputs), solo and packed, from the
    pack-of-PACK_SIZE row (solo and packed measured side by side)."""
    row = next((r for r in packing["rows"] if r["method"] == method and r["slots"] == PACK_SIZE), None)
    if row is None:
        raise SystemExit(f"error: the packing results have no {method} row with {PACK_SIZE} slots")
    costs = {}
    for mode in ("solo", "pack"):
        training = row.get(f"{mode}TrainingSeconds")
        if training is None:  # an older row: the whole time over the steps
            costs[mode] = {"step": 1 / row[f"{mode}ConceptStepsPerSecond"], "setup": None}
        else:
            costs[mode] = {"step": training / row["conceptSteps"], "setup": (row[f"{mode}Seconds"] - training) / row["slots"]}
    return costs


def clip_check_seconds(runs_dir: Path, concepts: list[str], templates: int) -> Optional[float]:
    """One guard check (clip_num_samples images at clip_inference_steps, scored), scaled from the
    base-model evaluations' seconds (eval_images_per_prompt x templates images at eval_inference_steps)."""
    per_check = []
    for concept in concepts:
        path = find_run(runs_dir, f"base_{concept}")
        if path is not None:
            base = read_run(path)
            denoising = base["eval_images_per_prompt"] * templates * base["eval_inference_steps"]
            per_check.append(base["seconds"] * base["clip_num_samples"] * base["clip_inference_steps"] / denoising)
    return statistics.median(per_check) if per_check else None


def floor_settings(method: str, baselines: dict, sweep: dict, guard: dict) -> list[dict]:
    """The studies' settings whose worst judged concept keeps >= TARGET_MIN_KEPT, each with its stops
    (and CLIP checks) replayed per concept."""
    found = []
    for row in sweep.get(method, {}).get("rows", []):
        if row["min_kept"] >= TARGET_MIN_KEPT:
            stops = [every_step_stop(b["losses"], row["window"], row["threshold"], method, row["min_steps"]) or b["budget"]
                     for b in baselines.values()]
            found.append({"setting": f"DVAR window {row['window']}, threshold {row['threshold']}, minSteps {row['min_steps']}",
                          "window": row["window"], "threshold": row["threshold"], "patience": None,
                          "stops": stops, "clip_checks": [0] * len(stops), **_kept(row)})
    for row in guard.get(method, {}).get("rows", []):
        if row["min_kept"] >= TARGET_MIN_KEPT:
            outcomes = [guarded_outcome(b, dvar_stop(method, b), row["patience"]) for b in baselines.values()]
            first = next(iter(baselines.values()))
            found.append({"setting": "DVAR alone" if row["patience"] is None else f"DVAR + CLIP guard, patience {row['patience']}",
                          "window": first["window"], "threshold": first["threshold"], "patience": row["patience"],
                          "stops": [o["stop"] for o in outcomes], "clip_checks": [o["clip_checks"] for o in outcomes], **_kept(row)})
    return found


def _kept(row: dict) -> dict:
    return {"worst_kept": row["min_kept"], "median_kept": row["median_kept"]}


def case(name: str, stop: str, steps: list[int], cost: dict, tracking_s: float, checks: float = 0.0,
         check_s: Optional[float] = None) -> dict:
    """One case's CPU-seconds per concept: setup + mean steps x (training + tracking) + its CLIP checks."""
    mean_steps = statistics.mean(steps)
    checks_s = checks * (check_s or 0.0)
    return {"case": name, "stop": stop, "concepts": len(steps), "mean_steps": mean_steps, "setup_seconds": cost["setup"],
            "train_seconds_per_step": cost["step"], "tracking_seconds_per_step": tracking_s,
            "clip_checks_per_concept": checks, "clip_check_seconds_per_concept": checks_s,
            "cpu_seconds_per_concept": (cost["setup"] or 0.0) + mean_steps * (cost["step"] + tracking_s) + checks_s}


def economics(method: str, inputs: dict, baselines: dict, concepts: list[str], check_s: Optional[float]) -> dict:
    """Cases (a) to (d) for one method, and whether (d) <= (b)."""
    costs = measured_costs(inputs["packing"], method)
    solo, pack = costs["solo"], costs["pack"]
    timing = inputs["step_timing"]["step_timing"][method]
    share = timing["eval_seconds_over_train_step_seconds"]
    settings = inputs["personalization"]["settings"][method]
    per_concept = inputs["personalization"]["table"][method]["dvar"]["per_concept"]
    dvar_steps = [per_concept[c]["steps"] for c in concepts if c in per_concept]
    dvar = f"DVAR window {settings['window']}, threshold {settings['threshold']}"
    budget = [settings["max_steps"]] * len(dvar_steps)
    cases = [case("(a) solo, fixed budget", f"maxSteps {settings['max_steps']}", budget, solo, 0.0),
             case("(b) solo DVAR", dvar, dvar_steps, solo, share * solo["step"]),
             case("(c) packed DVAR, refilled", dvar, dvar_steps, pack, share * pack["step"])]
    result = {"method": method, "costs": costs, "untracked_step_seconds": timing["median_step_seconds"]["no_tracking"],
              "tracking_share": share, "cases": cases, "floor": None, "d_at_most_b": None, "patience_only": None}

    def floor_case(candidate: dict, cost: dict, tracking_s: float) -> dict:
        return case("(d) packed, per-concept floor", candidate["setting"], candidate["stops"], cost, tracking_s,
                    statistics.mean(candidate["clip_checks"]), check_s)

    candidates = sorted(floor_settings(method, baselines, inputs["sweep"], inputs["guard"]),
                        key=lambda c: floor_case(c, pack, share * pack["step"])["cpu_seconds_per_concept"])
    result["floor_settings_found"] = len(candidates)
    if not candidates:
        return result
    pick, b = candidates[0], cases[1]["cpu_seconds_per_concept"]
    d = floor_case(pick, pack, share * pack["step"])
    cases.append(d)
    unpacked_c = case("", "", dvar_steps, pack, share * solo["step"])["cpu_seconds_per_concept"]
    unpacked_d = floor_case(pick, pack, share * solo["step"])["cpu_seconds_per_concept"]
    result.update(floor={k: pick[k] for k in ("setting", "worst_kept", "median_kept", "stops", "clip_checks")},
                  d_at_most_b=d["cpu_seconds_per_concept"] <= b,
                  d_solo=floor_case(pick, solo, share * solo["step"])["cpu_seconds_per_concept"],
                  tracking_unpacked={"c": unpacked_c, "d": unpacked_d, "d_at_most_b": unpacked_d <= b})
    # the cheapest that keeps (b)'s window and threshold: patience (minSteps or the guard) its only change
    patient = next((c for c in candidates if (c["window"], c["threshold"]) == (settings["window"], settings["threshold"])), None)
    if patient:
        result["patience_only"] = {"setting": patient["setting"], "worst_kept": patient["worst_kept"],
                                   "same_stops_as_c": sorted(patient["stops"]) == sorted(dvar_steps),
                                   "cpu_seconds_per_concept": floor_case(patient, pack, share * pack["step"])["cpu_seconds_per_concept"]}
    return result


def markdown(r: dict) -> str:
    b = r["cases"][1]["cpu_seconds_per_concept"]
    a = r["cases"][0]["cpu_seconds_per_concept"]
    lines = [f"### {r['method']}", "",
             f"Seconds per concept-step: solo {r['costs']['solo']['step']:.4f}, packed ({PACK_SIZE} slots) "
             f"{r['costs']['pack']['step']:.4f}; tracking (L_det every step) adds {r['tracking_share']:.0%} of a step. "
             f"For scale, step_timing's untracked solo step, without setup: {r['untracked_step_seconds']:.4f} s.", "",
             "| case | stop | steps per concept, mean (concepts) | setup and outputs s | training s / step | tracking s / step "
             "| CLIP checks s | CPU-s per concept | of (a) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in r["cases"]:
        setup = "in the step" if c["setup_seconds"] is None else f"{c['setup_seconds']:.2f}"
        lines.append(f"| {c['case']} | {c['stop']} | {c['mean_steps']:.1f} ({c['concepts']}) | {setup} | "
                     f"{c['train_seconds_per_step']:.4f} | "
                     f"{c['tracking_seconds_per_step']:.4f} | {c['clip_check_seconds_per_concept']:.1f} | "
                     f"{c['cpu_seconds_per_concept']:.2f} | {c['cpu_seconds_per_concept'] / a:.0%} |")
    if r["floor"] is None:
        lines += ["| (d) packed, per-concept floor | no recorded setting keeps >= "
                  f"{TARGET_MIN_KEPT:.0%} of the worst concept's gain | | | | | | n/a | |", "",
                  "**(d) <= (b)?** Not answerable: the stop studies record no setting that meets the floor for this method."]
        return "\n".join(lines) + "\n"
    d = r["cases"][3]["cpu_seconds_per_concept"]
    floor, unpacked = r["floor"], r["tracking_unpacked"]
    lines += ["", f"(d)'s setting keeps {floor['worst_kept']:.0%} of the gain on the worst judged concept and "
              f"{floor['median_kept']:.0%} on the median one; {r['floor_settings_found']} recorded settings meet the floor, "
              "this is the cheapest.",
              "", f"**(d) <= (b)? {'yes' if r['d_at_most_b'] else 'no'}**: {d:.2f} against {b:.2f} CPU-s per concept "
              f"({d / b:.2f}x); solo, (d)'s setting would cost {r['d_solo']:.2f}, so packing's share of the saving is "
              f"{r['d_solo'] - d:.2f} of {b - d:.2f}. With tracking not packed at all (L_det at its solo cost): (c) {unpacked['c']:.2f}, "
              f"(d) {unpacked['d']:.2f}, (d) <= (b) {'still holds' if unpacked['d_at_most_b'] else 'fails'}."]
    patient = r["patience_only"]
    lines += ["", "Keeping (b)'s window and threshold and only adding patience (minSteps or the guard): " + (
        f"{patient['setting']}, worst concept {patient['worst_kept']:.0%}, {patient['cpu_seconds_per_concept']:.2f} CPU-s per concept"
        + (" (the same stops as (b): its setting already meets the floor)." if patient["same_stops_as_c"] else ".")
        if patient else "no recorded setting meets the floor.")]
    return "\n".join(lines) + "\n"


def setup_note(packing: dict) -> str:
    if all("soloTrainingSeconds" in r and "packTrainingSeconds" in r for r in packing["rows"]):
        return ("Setup and outputs (loading the pipeline, writing each concept's files) are the rows' time outside "
                "training steps, paid once per concept; the pack's is spread over its slots.")
    return (f"These rates include each run's setup (loading the pipeline, writing outputs) spread over "
            f"{packing.get('stepsPerConcept', '?')} steps per concept; a concept that trains longer pays it once, so "
            "they overstate a long run's cost, the solo one's most.")


def main(argv: Optional[list[str]] = None) -> int:
    parser = study_parser(__doc__)
    parser.set_defaults(methods="textualInversion,lora")
    parser.add_argument("--packing", type=Path, default=RESULTS / "packing.json")
    parser.add_argument("--step-timing", type=Path, default=RESULTS / "step_timing.json")
    parser.add_argument("--personalization", type=Path, default=None, help="default: personalization_<set>.json")
    parser.add_argument("--sweep", type=Path, default=None, help="default: stop_sweep_<set>_min_steps.json")
    parser.add_argument("--guard", type=Path, default=None, help="default: guard_study_<set>.json")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    paths = {"packing": args.packing, "step_timing": args.step_timing,
             "personalization": args.personalization or RESULTS / f"personalization_{args.set}.json",
             "sweep": args.sweep or RESULTS / f"stop_sweep_{args.set}_min_steps.json",
             "guard": args.guard or RESULTS / f"guard_study_{args.set}.json"}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        print(f"error: missing input(s): {', '.join(missing)}", file=sys.stderr)
        return 2
    inputs = {name: json.loads(path.read_text()) for name, path in paths.items()}
    concepts = [c.name for c in CONCEPT_SETS[args.set]]
    check_s = clip_check_seconds(args.runs, concepts, len(inputs["personalization"]["evaluation"]["templates"]))
    results = [economics(m, inputs, load_baselines(args.runs, m, concepts), concepts, check_s)
               for m in args.methods.split(",")]
    named = {**{name: relative_to_repo(p) for name, p in paths.items()}, "runs": relative_to_repo(args.runs)}
    packing = inputs["packing"]
    left_out = [m for m in STUDIED_METHODS.split(",") if m not in {r["method"] for r in results}]
    guard_picked = any(r["floor"] and r["floor"]["clip_checks"] and max(r["floor"]["clip_checks"]) for r in results)
    sections = [
        f"# Packing economics: CPU-seconds per concept ({args.set} concepts, tiny world)", "",
        f"Command: `{command_line('packing_economics.py', argv)}`.", "",
        "**A model, not a run.** (c) and (d) are measured step rates times recorded step counts: no refilled pack "
        f"was run over the {args.set} set. Per-step costs come from `{named['packing']}` (`{packing.get('command', '?')}`, "
        f"{packing.get('device', '?')}; the {PACK_SIZE}-slot row, solo and packed measured side by side; a pack "
        f"with refill is taken to stay full). {setup_note(packing)} Tracking: L_det every step, "
        f"`{named['step_timing']}`'s evaluation share of a training step (criterion none in the packing benchmark). "
        f"Steps: (a) the budget, (b) and (c) the recorded DVAR runs in `{named['personalization']}`, (d) replayed "
        f"on the baselines in `{named['runs']}` for the cheapest setting in `{named['sweep']}` or `{named['guard']}` "
        f"whose worst judged concept keeps >= {TARGET_MIN_KEPT:.0%} of its gain (chosen and judged on the same "
        f"{len(concepts)} concepts). At one torch thread, wall seconds are CPU-seconds.", "",
        *([f"Not here: {', '.join(left_out)}. The packing benchmark measures no Custom Diffusion pack, and DreamBooth "
           "trains the shared weights, so it cannot pack ((c) and (d) n/a).", ""] if left_out else []),
        ("CLIP guard checks: " + (f"{check_s:.2f} s each, scaled from the base-model evaluations in `{named['runs']}` "
                                  "(an upper bound: those include loading the pipeline); not packed."
                                  if check_s is not None else "excluded (no recorded timing).")
         if guard_picked else "No (d) is a CLIP guard setting, so no CLIP check cost enters the table."), "",
        *[markdown(r) for r in results]]
    report = {"command": command_line("packing_economics.py", argv), "inputs": named, "pack_size": PACK_SIZE,
              "floor": TARGET_MIN_KEPT, "clip_check_seconds": check_s, "methods": {r["method"]: r for r in results}}
    write_study(args.out, f"packing_economics_{args.set}" if args.set != "dev" else "packing_economics", report, sections, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
