"""benchmarks/personalization.py --smoke: the table's structure and the variants' contracts
(few-iterations runs DVAR's mean stop, baseline runs its full budget, the CLIP criterion checks
every everySteps), on the shipped tiny world with a few steps."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

from personalize.world.tiny_models import TINY_WORLD_DIR

torch.set_num_threads(1)

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "personalization.py"

pytestmark = pytest.mark.skipif(
    not (TINY_WORLD_DIR / "model_index.json").exists(), reason="pretrained tiny world not built yet"
)


def load_benchmark():
    spec = importlib.util.spec_from_file_location("personalization_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    bench = load_benchmark()
    out = tmp_path_factory.mktemp("bench")
    assert bench.main(["--smoke", "--workers", "1", "--out", str(out)]) == 0
    return bench, out, json.loads((out / "personalization.json").read_text())


def test_table_has_every_variant_over_both_concepts(smoke):
    bench, out, report = smoke
    assert report["concepts"] == ["red_striped_triangle", "blue_dotted_star"]
    table = report["table"]
    assert list(table) == ["textualInversion"]
    assert list(table["textualInversion"]) == list(bench.VARIANTS)
    for variant, entry in table["textualInversion"].items():
        assert sorted(entry["per_concept"]) == sorted(report["concepts"])
        for key in ("steps", "wall_seconds", "clip_i", "clip_t", "clip_i_gain"):
            assert entry[key]["n"] == 2
            values = [c[key] for c in entry["per_concept"].values()] if key != "clip_i_gain" else None
            if values:
                assert entry[key]["mean"] == pytest.approx(statistics.fmean(values))
                assert entry[key]["std"] == pytest.approx(statistics.stdev(values))
        for concept, row in entry["per_concept"].items():
            assert -1.0 <= row["clip_i"] <= 1.0 and -1.0 <= row["clip_t"] <= 1.0
            gain = row["clip_i"] - report["base"][concept]["clip_i"]
            assert gain in [pytest.approx(g) for g in _gains(entry, report)]


def _gains(entry, report):
    return [row["clip_i"] - report["base"][c]["clip_i"] for c, row in entry["per_concept"].items()]


def test_baseline_runs_the_whole_budget_and_dvar_stops_within_it(smoke):
    bench, out, report = smoke
    entry = report["table"]["textualInversion"]
    budget = bench.SMOKE["max_steps"]
    assert entry["baseline"]["stop_reasons"] == {"MaxSteps": 2}
    assert all(row["steps"] == budget for row in entry["baseline"]["per_concept"].values())
    assert all(1 <= row["steps"] <= budget for row in entry["dvar"]["per_concept"].values())


def test_few_iterations_runs_dvars_mean_stop_step(smoke):
    bench, out, report = smoke
    entry = report["table"]["textualInversion"]
    dvar_steps = [row["steps"] for row in entry["dvar"]["per_concept"].values()]
    expected = round(statistics.fmean(dvar_steps))
    assert entry["fewIterations"]["max_steps"] == expected
    assert all(row["steps"] == expected for row in entry["fewIterations"]["per_concept"].values())


def test_per_run_series_match_the_runs(smoke):
    bench, out, report = smoke
    runs = out / "personalization_runs"
    files = sorted(p.name for p in runs.glob("*.json"))
    assert len(files) == 2 + 4 * 2  # base model per concept + 4 variants x 2 concepts
    dvar = json.loads((runs / "textualInversion_dvar_red_striped_triangle.json").read_text())
    series = dvar["series"]
    assert series["eval_steps"] == list(range(1, dvar["steps"] + 1))  # evalEvery 1, every step tracked
    assert len(series["deterministic_loss"]) == dvar["steps"]
    assert len(series["train_loss"]) == dvar["steps"] // bench.TRAIN_LOSS_STRIDE
    clip = json.loads((runs / "textualInversion_clip_red_striped_triangle.json").read_text())
    every = bench.SMOKE["clip_every"]
    # the first check only sets the best score; later ones report their gain over it
    assert clip["series"]["convergence_steps"] == list(range(2 * every, clip["steps"] + 1, every))
    baseline = json.loads((runs / "textualInversion_baseline_red_striped_triangle.json").read_text())
    assert "deterministic_loss" not in baseline["series"]  # no L_det tracking without early stopping


def test_gain_kept_and_target_are_computed_from_the_runs(smoke):
    bench, out, report = smoke
    entry = report["table"]["textualInversion"]
    base = report["base"]
    kept = []
    for concept in report["concepts"]:
        baseline_gain = entry["baseline"]["per_concept"][concept]["clip_i"] - base[concept]["clip_i"]
        dvar_gain = entry["dvar"]["per_concept"][concept]["clip_i"] - base[concept]["clip_i"]
        if baseline_gain > 0:
            kept.append(dvar_gain / baseline_gain)
    vs = entry["dvar"]["vs_baseline"]
    if kept:
        assert vs["median_gain_kept"] == pytest.approx(statistics.median(kept))
    target = report["target"]["textualInversion"]
    assert target["met"] == (
        target["gain_kept_at_least_90pct"] and target["steps_at_most_one_third"] and target["clip_t_within_spread"]
    )
    md = (out / "personalization.md").read_text()
    for variant in bench.VARIANTS:
        assert f"| textualInversion | {variant} |" in md


def test_finished_runs_are_reused(smoke):
    bench, out, report = smoke
    cached = out / "personalization_runs" / "textualInversion_dvar_blue_dotted_star.json"
    record = json.loads(cached.read_text())
    record["clip_i"] = 0.123  # a value no rerun would produce: shows up only if the file is reused
    cached.write_text(json.dumps(record))
    assert bench.main(["--smoke", "--workers", "1", "--out", str(out), "--variants", "dvar,fewIterations"]) == 0
    again = json.loads((out / "personalization.json").read_text())
    assert again["table"]["textualInversion"]["dvar"]["per_concept"]["blue_dotted_star"]["clip_i"] == 0.123
    assert list(again["table"]["textualInversion"]) == ["dvar", "fewIterations"]
