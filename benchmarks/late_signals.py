"""Stop signals beyond the averaged L_det, replayed on recorded baselines (issue 31, point 1).

    python benchmarks/late_signals.py --set dev --runs benchmarks/results/late_learners/dev/personalization_runs

The baselines must carry the series the personalization benchmark records since issue 31: L_det
per reference slot (`timestep_losses`), the training statistics at every step (`stats`) and, for
Textual Inversion, the learned embedding every few steps. Each candidate turns them into a
"converged" condition per step; the run stops at the first step where the condition holds (the
budget if never). The gain kept at that step is read off the baseline's CLIP-I curve (stop_sweep.py).

Candidates (window and threshold: the baseline's own DVAR settings unless a setting says otherwise):

  dvar            the averaged L_det's DVAR (today's criterion): the reference row
  slots_all       every slot's own DVAR below the threshold (every timestep flat)
  slots_scaled    DVAR of the mean of the slots, each divided by its first value (weighted by scale)
  slot_moved      DVAR of the slot whose L_det has fallen most, relative to its first value, so far
  cosine          mean cosine between successive updates over the last `span` steps <= `level`
  snr             mean of Adam's m^2/v (already a 10-step mean) over the last `span` steps <= `level`
                  (pure noise reads about 0.05 at beta1 0.9)
  embedding       Textual Inversion: the learned embedding's angle to itself `lag` steps earlier
                  <= `degrees` (its norm keeps growing after convergence; its direction should not)
  dvar+X          DVAR and X at the same step

The target (issue 31): median judged concept keeps >= 90% of the baseline's gain, the worst judged
>= 70%, at <= 0.40 of the budget (median). No training: seconds per set.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Callable, Optional

from personalize.criteria import build_criterion
from personalize.world.shapes import CONCEPT_SETS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recorded_runs import RESULTS, command_line, every_step_runs, find_run, read_run, study_parser, write_study  # noqa: E402  (sibling script modules)
from stop_quality import MIN_JUDGED_GAIN  # noqa: E402
from stop_sweep import curve_gains, gain_at  # noqa: E402

TARGET_MEDIAN, TARGET_WORST, TARGET_STEPS = 0.90, 0.70, 0.40
SNR_NOISE = 0.05  # (1 - beta1) / (1 + beta1) at beta1 0.9: what m^2/v reads on pure noise
# Settings tried per candidate on dev (each a dict of the candidate's keyword arguments).
GRID: dict[str, list[dict]] = {
    "dvar": [{}],
    "slots_all": [{"threshold": t} for t in (None, 0.2, 0.3, 0.4)],
    "slots_scaled": [{"threshold": t} for t in (None, 0.2, 0.3)],
    "slot_moved": [{"threshold": t} for t in (None, 0.2, 0.3)],
    # Adam's momentum keeps successive updates nearly parallel (0.85-0.95 on the tiny world's
    # TI runs throughout), so the levels go up to 0.9 besides the "stops being positive"
    "cosine": [{"span": s, "level": v} for s, v in itertools.product((20, 40, 60), (0.0, 0.5, 0.8, 0.85, 0.9))],
    "snr": [{"span": s, "level": v} for s, v in itertools.product((20, 40, 60), (0.02, 0.03, 0.04, 0.05, 0.08))],
    "embedding": [{"lag": g, "degrees": d} for g, d in itertools.product((25, 50), (5.0, 8.0, 10.0, 12.0, 15.0))],
}
COMBINED = ("slots_all", "cosine", "snr", "embedding")  # each also tried as dvar+X


def load_runs(runs_dir: Path, method: str, concepts: list[str]) -> dict[str, dict]:
    """concept -> the baseline's series for the candidates: every-step L_det (mean and per slot),
    statistics, embedding (TI), CLIP-I gains over the base model, budget and DVAR settings."""
    out = {}
    for run in every_step_runs(runs_dir, method=method, concepts=concepts, variants=("baseline",)):
        series, base_path = run["series"], find_run(runs_dir, f"base_{run['concept']}")
        if not (base_path is not None and series.get("curve_steps") and series.get("timestep_losses")
                and series.get("stats")):
            continue  # recorded before the per-slot series (or no CLIP-I curve): nothing to replay
        steps, gains = curve_gains(series, read_run(base_path)["clip_i"])
        out[run["concept"]] = {
            "budget": run["steps"], "window": run["window"], "threshold": run["threshold"],
            "losses": series["deterministic_loss"], "slots": series["timestep_losses"], "stats": series["stats"],
            "embedding_steps": series.get("embedding_steps", []), "embedding": series.get("embedding", []),
            "steps": steps, "gains": gains, "judged": gains[-1] >= MIN_JUDGED_GAIN,
        }
    return out


# ---------------------------------------------------------------------------- per-step series


def dvar_values(losses: list[float], window: int, threshold: float) -> list[Optional[float]]:
    """DVAR's convergence value after each step (None until its window is full)."""
    criterion = build_criterion("dvar", window, 1, threshold)
    return [criterion.update(x) for x in losses]


def trailing_mean(values: list[Optional[float]], span: int) -> list[Optional[float]]:
    """Mean of the last `span` defined values at each step (None until `span` steps have passed)."""
    out = []
    for t in range(len(values)):
        recent = [v for v in values[max(0, t - span + 1): t + 1] if v is not None]
        out.append(statistics.fmean(recent) if t + 1 >= span and recent else None)
    return out


def angle_degrees(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    norm = math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
    return math.degrees(math.acos(max(-1.0, min(1.0, dot / norm)))) if norm > 0 else math.nan


def embedding_angles(run: dict, lag: int) -> list[Optional[float]]:
    """Per step: the embedding's angle to itself `lag` steps earlier, known at each recorded step
    and held until the next one (None before the first pair)."""
    at = dict(zip(run["embedding_steps"], run["embedding"]))
    out, current = [], None
    for step in range(1, run["budget"] + 1):
        if step in at and step - lag in at:
            current = angle_degrees(at[step], at[step - lag])
        out.append(current)
    return out


# ---------------------------------------------------------------------------- the candidates


def below(values: list[Optional[float]], level: float) -> list[bool]:
    return [v is not None and abs(v) < level for v in values]


def at_most(values: list[Optional[float]], level: float) -> list[bool]:
    return [v is not None and v <= level for v in values]


def cond_dvar(run: dict) -> list[bool]:
    return below(dvar_values(run["losses"], run["window"], run["threshold"]), run["threshold"])


def cond_slots_all(run: dict, threshold: Optional[float] = None) -> list[bool]:
    level = threshold or run["threshold"]
    each = [below(dvar_values(v, run["window"], level), level) for v in run["slots"].values()]
    return [all(flat) for flat in zip(*each)]


def cond_slots_scaled(run: dict, threshold: Optional[float] = None) -> list[bool]:
    level = threshold or run["threshold"]
    scaled = [[x / v[0] for x in v] for v in run["slots"].values()]
    mean = [statistics.fmean(xs) for xs in zip(*scaled)]
    return below(dvar_values(mean, run["window"], level), level)


def moved_most(slots: dict[str, list[float]]) -> list[str]:
    """Per step: the slot whose L_det has fallen most so far, relative to its first value."""
    lowest = {k: v[0] for k, v in slots.items()}
    out = []
    for t in range(len(next(iter(slots.values())))):
        for k, v in slots.items():
            lowest[k] = min(lowest[k], v[t])
        out.append(max(slots, key=lambda k: (slots[k][0] - lowest[k]) / slots[k][0]))
    return out


def cond_slot_moved(run: dict, threshold: Optional[float] = None) -> list[bool]:
    level = threshold or run["threshold"]
    values = {k: dvar_values(v, run["window"], level) for k, v in run["slots"].items()}
    return [values[k][t] is not None and abs(values[k][t]) < level for t, k in enumerate(moved_most(run["slots"]))]


def cond_cosine(run: dict, span: int, level: float) -> list[bool]:
    return at_most(trailing_mean(run["stats"]["update_cosine"], span), level)


def cond_snr(run: dict, span: int, level: float) -> list[bool]:
    return at_most(trailing_mean(run["stats"]["adam_snr"], span), level)


def cond_embedding(run: dict, lag: int, degrees: float) -> list[bool]:
    return at_most(embedding_angles(run, lag), degrees)


CANDIDATES: dict[str, Callable[..., list[bool]]] = {
    "dvar": cond_dvar, "slots_all": cond_slots_all, "slots_scaled": cond_slots_scaled,
    "slot_moved": cond_slot_moved, "cosine": cond_cosine, "snr": cond_snr, "embedding": cond_embedding,
}


def applies(candidate: str, method: str) -> bool:
    return not candidate.endswith("embedding") or method == "textualInversion"


def condition(candidate: str, settings: dict, run: dict) -> list[bool]:
    """The candidate's converged-or-not at each step; `dvar+X`: both at the same step."""
    if candidate.startswith("dvar+"):
        other = CANDIDATES[candidate[len("dvar+"):]](run, **settings)
        return [a and b for a, b in zip(cond_dvar(run), other)]
    return CANDIDATES[candidate](run, **settings)


def first_true(flags: list[bool]) -> Optional[int]:
    return next((step for step, flag in enumerate(flags, start=1) if flag), None)


def outcome(candidate: str, settings: dict, run: dict) -> dict:
    stop = first_true(condition(candidate, settings, run)) or run["budget"]
    kept = gain_at(stop, run["steps"], run["gains"]) / run["gains"][-1] if run["judged"] else None
    return {"stop": stop, "kept": kept}


def summarize(outcomes: dict[str, dict], budget: int) -> dict:
    kept = [o["kept"] for o in outcomes.values() if o["kept"] is not None]
    median_kept = statistics.median(kept) if kept else math.nan
    worst = min(kept) if kept else math.nan
    steps = statistics.median(o["stop"] / budget for o in outcomes.values())
    return {"median_kept": median_kept, "worst_kept": worst, "median_steps_ratio": steps, "judged": len(kept),
            "meets_target": bool(median_kept >= TARGET_MEDIAN and worst >= TARGET_WORST and steps <= TARGET_STEPS),
            "stops": {c: o["stop"] for c, o in outcomes.items()},
            "kept": {c: (None if o["kept"] is None else round(o["kept"], 3)) for c, o in outcomes.items()}}


def candidates() -> list[tuple[str, dict]]:
    out = [(name, s) for name, grid in GRID.items() for s in grid]
    out += [(f"dvar+{name}", s) for name in COMBINED for s in GRID[name]]
    return out


def replay(runs: dict[str, dict[str, dict]]) -> list[dict]:
    """Every candidate and setting on every method's runs: one row per (candidate, setting)."""
    rows = []
    for name, settings in candidates():
        per_method = {}
        for method, by_concept in runs.items():
            if by_concept and applies(name, method):
                budget = next(iter(by_concept.values()))["budget"]
                per_method[method] = summarize({c: outcome(name, settings, r) for c, r in by_concept.items()}, budget)
        rows.append({"candidate": name, "settings": settings, "methods": per_method,
                     "methods_meeting": sum(m["meets_target"] for m in per_method.values())})
    return rows


def closeness(m: dict) -> float:
    """How near one method's outcome is to the target, each part capped at its bound (3 = met)."""
    if not math.isfinite(m["median_kept"]):
        return min(1.0, TARGET_STEPS / m["median_steps_ratio"])
    return (min(1.0, m["median_kept"] / TARGET_MEDIAN) + min(1.0, max(m["worst_kept"], 0.0) / TARGET_WORST)
            + min(1.0, TARGET_STEPS / m["median_steps_ratio"]))


def best_per_candidate(rows: list[dict]) -> list[dict]:
    """Per candidate, its setting that meets the target on the most methods, then comes nearest to
    it summed over methods (`closeness`)."""
    best: dict[str, dict] = {}
    for row in rows:
        key = (row["methods_meeting"], sum(closeness(m) for m in row["methods"].values()))
        if row["candidate"] not in best or key > best[row["candidate"]]["_key"]:
            best[row["candidate"]] = {**row, "_key": key}
    return [{k: v for k, v in row.items() if k != "_key"} for row in best.values()]


# ---------------------------------------------------------------------------- late learners


def late_learners(runs: dict[str, dict[str, dict]]) -> list[tuple[str, str]]:
    """(method, concept) of judged concepts that today's DVAR stops under 70% of their gain."""
    return [(m, c) for m, by in runs.items() for c, r in by.items()
            if (o := outcome("dvar", {}, r))["kept"] is not None and o["kept"] < TARGET_WORST]


def appears_at(run: dict, share: float = 0.5) -> int:
    """The first scored step whose gain reaches `share` of the final gain: where the concept appears."""
    return next(s for s, g in zip(run["steps"], run["gains"]) if g >= share * run["gains"][-1])


def late_learner_trace(run: dict, method: str) -> dict:
    """What each signal read at today's DVAR stop and where the concept appears: every slot's DVAR
    value and relative L_det change, the update cosine and Adam SNR (40-step means), the embedding's
    angle over 25 steps (TI)."""
    stop = outcome("dvar", {}, run)["stop"]
    appear = appears_at(run)
    window, level = run["window"], run["threshold"]

    def at(values, step):
        v = values[step - 1] if 0 < step <= len(values) else None
        return None if v is None else round(v, 4)

    slots = {}
    for label, values in run["slots"].items():
        dvar = dvar_values(values, window, level)
        start = statistics.fmean(values[: min(10, len(values))])
        slots[label] = {"dvar_at_stop": at(dvar, stop),
                        "change_to_stop": round(values[stop - 1] / start - 1, 4),
                        "change_stop_to_appear": round(values[appear - 1] / values[stop - 1] - 1, 4)}
    trace = {"method": method, "dvar_stop": stop, "appears_at": appear, "kept_at_dvar_stop": outcome("dvar", {}, run)["kept"],
             # appeared before the stop: the curve dipped at the stop (its wobble), not a late learner
             "late": appear > stop,
             "slots": slots,
             "cosine40": {"at_stop": at(trailing_mean(run["stats"]["update_cosine"], 40), stop),
                          "at_appear": at(trailing_mean(run["stats"]["update_cosine"], 40), appear)},
             "snr40": {"at_stop": at(trailing_mean(run["stats"]["adam_snr"], 40), stop),
                       "at_appear": at(trailing_mean(run["stats"]["adam_snr"], 40), appear)}}
    if run["embedding"]:
        angles = embedding_angles(run, 25)
        trace["embedding_angle25"] = {"at_stop": at(angles, stop), "at_appear": at(angles, appear)}
    return trace


# ---------------------------------------------------------------------------- report


def fmt(settings: dict) -> str:
    return ", ".join(f"{k} {v if v is not None else 'own'}" for k, v in settings.items()) or "-"


def cell(m: Optional[dict]) -> str:
    if m is None:
        return "-"
    return (f"{m['median_kept']:.0%} / {m['worst_kept']:.0%} / {m['median_steps_ratio']:.2f}"
            + (" **met**" if m["meets_target"] else ""))


def markdown(concept_set: str, runs: dict, rows: list[dict], best: list[dict], traces: dict, command: str) -> list[str]:
    methods = list(runs)
    counts = ", ".join(f"{m} {len(by)}" for m, by in runs.items())
    lines = [f"# Stop signals beyond the averaged L_det ({concept_set} concepts)", "",
             f"Command: `{command}`. Baselines replayed: {counts}. Cells: gain kept, median judged concept / "
             f"worst judged concept / median stop over the budget; **met**: >= {TARGET_MEDIAN:.0%} / >= "
             f"{TARGET_WORST:.0%} / <= {TARGET_STEPS}. Gain read off the baseline's CLIP-I curve.", "",
             "## Each candidate's best setting", "",
             "| candidate | setting | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for row in best:
        lines.append(f"| {row['candidate']} | {fmt(row['settings'])} | "
                     + " | ".join(cell(row["methods"].get(m)) for m in methods) + " |")
    lines += ["", "## Every setting", "", "| candidate | setting | " + " | ".join(methods) + " |",
              "|---|---|" + "---|" * len(methods)]
    for row in rows:
        lines.append(f"| {row['candidate']} | {fmt(row['settings'])} | "
                     + " | ".join(cell(row["methods"].get(m)) for m in methods) + " |")
    lines += ["", "## Late learners: what each signal read at today's DVAR stop", "",
              "Late learner: a judged concept that DVAR (averaged L_det) stops under 70% of its gain. Appears: the "
              "first scored step at half the final gain. Per slot: its own DVAR value at the stop, its L_det change "
              "from the first 10 steps to the stop, and from the stop to the appearance.", ""]
    for name, t in traces.items():
        slots = "; ".join(f"{label}: DVAR {s['dvar_at_stop']}, {s['change_to_stop']:+.1%} then {s['change_stop_to_appear']:+.1%}"
                          for label, s in t["slots"].items())
        extra = (f"; embedding angle over 25 steps {t['embedding_angle25']['at_stop']} deg at the stop, "
                 f"{t['embedding_angle25']['at_appear']} at the appearance" if "embedding_angle25" in t else "")
        kind = "late learner" if t["late"] else "appeared before the stop: a dip of the curve, not a late learner"
        lines.append(f"- **{name}** ({kind}): DVAR stops at {t['dvar_stop']} keeping {t['kept_at_dvar_stop']:.0%}; "
                     f"appears at {t['appears_at']}. {slots}. Update cosine (40-step mean) {t['cosine40']['at_stop']} at the stop, "
                     f"{t['cosine40']['at_appear']} at the appearance; Adam SNR {t['snr40']['at_stop']} -> "
                     f"{t['snr40']['at_appear']}{extra}.")
    return lines + [""]


def main(argv: Optional[list[str]] = None) -> int:
    parser = study_parser(__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS / "late_learners")
    args = parser.parse_args(argv)
    concepts = [c.name for c in CONCEPT_SETS[args.set]]
    runs = {m: r for m in args.methods.split(",") if (r := load_runs(args.runs, m, concepts))}
    if not runs:
        print(f"error: no baselines with per-slot L_det, statistics and CLIP-I curves in {args.runs}", file=sys.stderr)
        return 2
    rows = replay(runs)
    best = best_per_candidate(rows)
    traces = {f"{m}/{c}": late_learner_trace(runs[m][c], m) for m, c in late_learners(runs)}
    command = command_line("late_signals.py", argv)
    report = {"concept_set": args.set, "command": command, "target": [TARGET_MEDIAN, TARGET_WORST, TARGET_STEPS],
              "concepts": {m: sorted(r) for m, r in runs.items()}, "best": best, "rows": rows, "late_learners": traces}
    write_study(args.out, f"late_signals_{args.set}", report, markdown(args.set, runs, rows, best, traces, command), args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
