"""How good a stop step is, judged against the baseline's own CLIP-I curve, and what tracking costs.

Pure functions (no torch), used by benchmarks/personalization.py:

    s90([0, 25, 50], [0.0, 0.10, 0.12])        # -> 25: first step reaching 90% of the final gain
    stop_verdict(stop_step=20, s90=25)         # -> "premature" (before s90); > 2*s90 is "waste"
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Optional, Sequence

S90_FRACTION = 0.9
# A concept whose baseline gains less CLIP-I than this is not judged by "gain kept": its CLIP-I
# wobbles by about as much from one scored step to the next (benchmarks/stop_sweep.py measures the
# spread of each baseline's plateau; on the second world's dev set the median is 0.012), so the
# ratio of two such numbers is noise (-215% and 93% on dev concepts that gained 0.010 and 0.028).
MIN_JUDGED_GAIN = 0.03
# The stop's target, DVAR against the baseline, per method over a concept set: the median
# concept keeps >= 90% of the baseline's CLIP-I gain, no judged concept keeps under 70%, at <= 1/3
# of the baseline's steps (median). The one statement of it: the benchmark and the replay studies
# all check `meets_target`.
TARGET_MEDIAN_KEPT = 0.9
TARGET_MIN_KEPT = 0.7
TARGET_STEPS_RATIO = 1 / 3
WASTE_FACTOR = 2.0  # stopping after WASTE_FACTOR * s90 spends at least as many steps again for 10% of the gain


def s90(steps: Sequence[int], gains: Sequence[float], fraction: float = S90_FRACTION,
        min_gain: float = 0.0) -> Optional[int]:
    """The first step whose CLIP-I gain reaches `fraction` of the run's final gain (the last value).

    `gains` are CLIP-I minus the untrained model's CLIP-I, measured at `steps` (ascending). None
    when the run ends without a gain above `min_gain` (final gain <= min_gain): no step can be "90%
    of nothing", and 90% of a gain within the score's own noise is a coin toss."""
    if len(steps) != len(gains) or not steps:
        raise ValueError("steps and gains must be non-empty and of equal length")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError("steps must be strictly increasing")
    final = gains[-1]
    if not final > min_gain:
        return None
    for step, gain in zip(steps, gains):
        if gain >= fraction * final:
            return int(step)
    return int(steps[-1])  # unreachable: the last gain is the final one


def target_checks(median_kept: float, min_kept: float, steps_ratio: float) -> dict[str, bool]:
    """The target's three parts, each True when met (NaN, no judged concept, meets none)."""
    return {
        "gain_kept_at_least_90pct": bool(median_kept >= TARGET_MEDIAN_KEPT),
        "no_concept_under_70pct": bool(min_kept >= TARGET_MIN_KEPT),
        "steps_at_most_one_third": bool(steps_ratio <= TARGET_STEPS_RATIO),
    }


def meets_target(median_kept: float, min_kept: float, steps_ratio: float) -> bool:
    return all(target_checks(median_kept, min_kept, steps_ratio).values())


def stop_verdict(stop_step: int, s90_step: Optional[int], waste_factor: float = WASTE_FACTOR) -> str:
    """'premature' before s90, 'waste' after waste_factor * s90, else 'ok'; 'n/a' without an s90."""
    if s90_step is None:
        return "n/a"
    if stop_step < s90_step:
        return "premature"
    if stop_step > waste_factor * s90_step:
        return "waste"
    return "ok"


def stop_quality(curves: dict[str, dict], stops: dict[str, int], min_gain: float = 0.0) -> dict:
    """Per concept: s90 of the baseline's curve, the early-stop step and its verdict; counts.

    curves: concept -> {"steps": [...], "gains": [...]} (the baseline's CLIP-I gain every k steps,
    starting with step 0 = gain 0); stops: concept -> the stop step of the criterion under test."""
    per_concept = {}
    for concept, curve in curves.items():
        if concept not in stops:
            continue
        point = s90(curve["steps"], curve["gains"], min_gain=min_gain)
        stop = stops[concept]
        per_concept[concept] = {
            "s90": point,
            "stop_step": stop,
            "stop_over_s90": stop / point if point else None,
            "final_gain": curve["gains"][-1],
            "verdict": stop_verdict(stop, point),
        }
    counts = {v: sum(p["verdict"] == v for p in per_concept.values()) for v in ("premature", "ok", "waste", "n/a")}
    ratios = [p["stop_over_s90"] for p in per_concept.values() if p["stop_over_s90"] is not None]
    return {"per_concept": per_concept, "counts": counts,
            "median_stop_over_s90": statistics.median(ratios) if ratios else None}


def steady_seconds_per_step(step_seconds: Sequence[float], skip: int) -> float:
    """Mean seconds per step after the first `skip` steps (warm-up: allocator, caches, first L_det)."""
    steady = list(step_seconds[skip:])
    if not steady:
        raise ValueError(f"only {len(step_seconds)} steps: nothing left after skipping {skip}")
    return statistics.fmean(steady)


def tracking_cost(pairs: Sequence[tuple[float, float]]) -> dict:
    """pairs of (untracked, tracked) seconds per step, each pair measured side by side.

    The ratio is taken within each pair (both runs saw the same machine load), then its median."""
    if not pairs:
        raise ValueError("no timing pairs")
    ratios = [tracked / untracked for untracked, tracked in pairs]
    return {
        "untracked_s_per_step": statistics.fmean(u for u, _ in pairs),
        "tracked_s_per_step": statistics.fmean(t for _, t in pairs),
        "ratio_per_pair": ratios,
        "median_ratio": statistics.median(ratios),
        "pairs": len(pairs),
    }


def plot_stop_quality(method: str, curves: dict[str, dict], quality: dict, out: Path) -> Path:
    """One picture per method: each concept's baseline gain curve (as a share of its final gain)
    with s90 and the stop step marked; and the stop step against s90 with the ok band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    per_concept = quality["per_concept"]
    for index, (concept, curve) in enumerate(sorted(curves.items())):
        entry = per_concept.get(concept)
        final = curve["gains"][-1]
        if entry is None or entry["s90"] is None:  # no gain worth judging: nothing to scale by
            continue
        colour = colours[index % len(colours)]
        left.plot(curve["steps"], [g / final for g in curve["gains"]], color=colour, lw=1.2, label=concept)
        left.axvline(entry["s90"], color=colour, ls=":", lw=0.8)
        left.plot([entry["stop_step"]], [0.02], marker="v", color=colour, ms=8)
    left.axhline(S90_FRACTION, color="grey", ls="--", lw=0.8)
    left.set_xlabel("step")
    left.set_ylabel("CLIP-I gain / final gain (baseline)")
    left.set_title(f"{method}: baseline curves; dotted = s90, triangle = stop")
    if left.lines:
        left.legend(fontsize=6, loc="lower right")
    points = [(p["s90"], p["stop_step"], p["verdict"]) for p in per_concept.values() if p["s90"] is not None]
    marker_colour = {"premature": "tab:red", "ok": "tab:green", "waste": "tab:orange"}
    for s, stop, verdict in points:
        right.scatter([s], [stop], color=marker_colour[verdict], s=30)
    top = max([1.0] + [max(s, stop) for s, stop, _ in points]) * 1.1
    xs = [0, top]
    right.fill_between(xs, xs, [WASTE_FACTOR * x for x in xs], color="tab:green", alpha=0.12, label="ok: s90 <= stop <= 2 s90")
    right.plot(xs, xs, color="tab:red", lw=0.8, label="stop = s90 (below: premature)")
    right.plot(xs, [WASTE_FACTOR * x for x in xs], color="tab:orange", lw=0.8, label="stop = 2 s90 (above: waste)")
    right.set_xlim(0, top)
    right.set_ylim(0, top)
    right.set_xlabel("s90 (baseline)")
    right.set_ylabel("stop step")
    counts = quality["counts"]
    right.set_title(f"premature {counts['premature']}, ok {counts['ok']}, waste {counts['waste']}, n/a {counts['n/a']}")
    right.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = out / f"stop_quality_{method}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def fmt_ratio(value: Optional[float]) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"
