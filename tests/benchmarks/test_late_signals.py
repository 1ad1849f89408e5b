"""benchmarks/late_signals.py: stop signals beyond the averaged L_det, replayed on recorded
baselines (per-slot DVAR and its variants, update cosine, Adam SNR, the TI embedding's direction)."""

from __future__ import annotations

import json
import math

import pytest
from script_module import load_script

ls = load_script("late_signals", "late_signals_under_test")

N, WINDOW, THRESHOLD = 300, 40, 0.15


def _wobble(i: int, size: float) -> float:
    return size * ((i * 7919) % 13 - 6) / 6


def _falling(knee: int, start: float, drop: float, wobble: float) -> list[float]:
    """Flat at `start` until `knee`, falls by `drop` over 40 steps, then flat; a deterministic wobble."""
    return [start - drop * min(max(i - knee, 0), 40) / 40 + _wobble(i, wobble) for i in range(1, N + 1)]


def _run(slots: dict[str, list[float]], stats=None, embedding=None, gain_from=0) -> dict:
    """A baseline as load_runs returns it: the curve's gain rises after `gain_from`."""
    steps = list(range(0, N + 1, 25))
    mean = [sum(v) / len(v) for v in zip(*slots.values())]
    stats = stats or {"update_cosine": [0.9] * N, "adam_snr": [0.1] * N}
    return {"budget": N, "window": WINDOW, "threshold": THRESHOLD, "losses": mean, "slots": slots, "stats": stats,
            "embedding_steps": [s for s, _ in embedding or []], "embedding": [e for _, e in embedding or []],
            "steps": steps, "gains": [0.1 * min(max(s - gain_from, 0), 50) / 50 for s in steps], "judged": True}


def late_slot_run() -> dict:
    """A large slot learned at once and a small one that falls only from step 150 (a late learner):
    the averaged L_det is flat long before the small slot moves."""
    return _run({"t=0900": _falling(0, 1.0, 0.3, 0.002), "t=0100": _falling(150, 0.02, 0.01, 0.0001)}, gain_from=150)


def test_every_slot_flat_waits_for_the_late_slot_that_the_average_hides():
    run = late_slot_run()
    dvar = ls.first_true(ls.cond_dvar(run))
    every = ls.first_true(ls.cond_slots_all(run))
    assert dvar is not None and dvar < 150  # the mean is dominated by the large, early slot
    assert every is not None and every > 190  # the small slot falls over 150-190, then needs its window
    assert ls.outcome("dvar", {}, run)["kept"] == 0.0 and ls.outcome("slots_all", {}, run)["kept"] > 0.9


def test_scaled_slots_weigh_each_slot_by_its_own_first_value():
    large, small = _falling(0, 1.0, 0.3, 0.002), _falling(150, 0.02, 0.01, 0.0001)
    run = _run({"t=0900": large, "t=0100": small})
    relative = [(a / large[0] + b / small[0]) / 2 for a, b in zip(large, small)]
    expected = ls.first_true(ls.below(ls.dvar_values(relative, WINDOW, THRESHOLD), THRESHOLD))
    assert ls.first_true(ls.cond_slots_scaled(run)) == expected
    # slots of one shape at any scales read as that shape: DVAR is scale-free
    same = _run({"t=0900": large, "t=0100": [x / 50 for x in large]})
    assert ls.first_true(ls.cond_slots_scaled(same)) == ls.first_true(ls.cond_dvar(_run({"t=0900": large})))


def test_the_slot_that_moved_most_is_tracked_per_step():
    slots = {"a": [1.0, 0.9, 0.9, 0.9], "b": [1.0, 1.0, 0.5, 0.5]}
    assert ls.moved_most(slots) == ["a", "a", "b", "b"]  # ties go to the first slot


def test_trailing_mean_skips_undefined_values_and_waits_for_its_span():
    assert ls.trailing_mean([None, 1.0, 3.0, 5.0], 2) == [None, 1.0, 2.0, 4.0]
    assert ls.trailing_mean([1.0, 2.0], 3) == [None, None]


def test_statistics_signals_stop_where_their_trailing_mean_reaches_the_level():
    cosine = [0.95] * 100 + [0.5] * (N - 100)
    snr = [0.2] * 60 + [0.03] * (N - 60)
    run = _run({"t=0500": _falling(0, 1.0, 0.3, 0.002)}, stats={"update_cosine": cosine, "adam_snr": snr})
    # a 20-step mean of 0.95 and 0.5 reaches 0.8 once 7 of the 20 are 0.5: step 107
    assert ls.first_true(ls.cond_cosine(run, span=20, level=0.8)) == 107
    assert ls.first_true(ls.cond_snr(run, span=20, level=0.05)) == 60 + 18  # (2*0.2 + 18*0.03) / 20 = 0.047
    both = ls.first_true(ls.condition("dvar+snr", {"span": 20, "level": 0.05}, run))
    assert both == max(ls.first_true(ls.cond_dvar(run)), 78)  # DVAR stays true once the loss is flat


def test_the_embedding_signal_reads_its_direction_not_its_norm():
    # turns by 3 degrees per recorded step until step 100, then only grows along its last direction
    embedding = []
    for step in range(5, N + 1, 5):
        angle = math.radians(3 * min(step, 100) / 5)
        norm = 1 + step / 50
        embedding.append((step, [norm * math.cos(angle), norm * math.sin(angle)]))
    run = _run({"t=0500": _falling(0, 1.0, 0.3, 0.002)}, embedding=embedding)
    angles = ls.embedding_angles(run, 25)
    assert angles[24] is None and angles[29] == pytest.approx(15.0)  # steps 30 and 5: 5 records of 3 degrees
    assert angles[124] == pytest.approx(0.0, abs=1e-6)  # steps 125 and 100: the norm grew, the direction did not
    assert ls.first_true(ls.cond_embedding(run, lag=25, degrees=5.0)) == 120  # 120 vs 95: one turn of 3 degrees
    assert not ls.applies("embedding", "lora") and ls.applies("dvar+embedding", "textualInversion")


def test_the_target_needs_the_median_the_worst_and_the_steps():
    outcomes = {"a": {"stop": 100, "kept": 0.95}, "b": {"stop": 120, "kept": 0.75}, "c": {"stop": 110, "kept": None}}
    summary = ls.summarize(outcomes, 400)
    assert summary["median_kept"] == pytest.approx(0.85) and summary["worst_kept"] == 0.75
    assert summary["median_steps_ratio"] == pytest.approx(110 / 400) and not summary["meets_target"]
    outcomes["c"]["kept"] = 0.95
    assert ls.summarize(outcomes, 400)["meets_target"]
    assert not ls.summarize(outcomes, 200)["meets_target"]  # 0.55 of the budget


def test_late_learners_are_the_concepts_dvar_cuts_short():
    runs = {"lora": {"late": late_slot_run(), "fine": _run({"t=0500": _falling(0, 1.0, 0.3, 0.002)})}}
    assert ls.late_learners(runs) == [("lora", "late")]
    trace = ls.late_learner_trace(runs["lora"]["late"], "lora")
    assert trace["appears_at"] == 175 and trace["late"]  # half of the final gain: 25 steps after it starts rising at 150
    small, large = trace["slots"]["t=0100"], trace["slots"]["t=0900"]
    assert small["change_stop_to_appear"] < -0.2 and abs(large["change_stop_to_appear"]) < 0.02


def test_main_reads_run_files_and_writes_the_tables(tmp_path):
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    run = late_slot_run()
    (runs_dir / "lora_baseline_red_striped_triangle.json").write_text(json.dumps({
        "kind": "run", "method": "lora", "variant": "baseline", "concept": "red_striped_triangle", "steps": N,
        "window": WINDOW, "threshold": THRESHOLD,
        "series": {"eval_steps": list(range(1, N + 1)), "deterministic_loss": run["losses"],
                   "timestep_losses": run["slots"], "stats": run["stats"],
                   "curve_steps": run["steps"][1:], "curve_clip_i": [0.5 + g for g in run["gains"][1:]]}}))
    (runs_dir / "base_red_striped_triangle.json").write_text(json.dumps({"clip_i": 0.5}))
    assert ls.main(["--runs", str(runs_dir), "--methods", "lora", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "late_signals_dev.json").read_text())
    assert {r["candidate"] for r in report["best"]} >= {"dvar", "slots_all", "cosine", "snr", "dvar+cosine"}
    assert "lora/red_striped_triangle" in report["late_learners"]
    assert "| slots_all |" in (tmp_path / "late_signals_dev.md").read_text()
