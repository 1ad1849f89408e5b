"""benchmarks/personalization.py --smoke: the table's structure and the variants' contracts
(few-iterations runs DVAR's mean stop, baseline runs its full budget, the CLIP criterion checks
every everySteps), on the shipped tiny world with a few steps."""

from __future__ import annotations

import json
import statistics
import sys

import pytest
from script_module import load_script
import torch

from personalize.world.tiny_models import TINY_WORLD_DIR

torch.set_num_threads(1)


pytestmark = pytest.mark.skipif(
    not (TINY_WORLD_DIR / "model_index.json").exists(), reason="pretrained tiny world not built yet"
)


def load_benchmark():
    return load_script("personalization", "personalization_benchmark")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    bench = load_benchmark()
    out = tmp_path_factory.mktemp("bench")
    assert bench.main(["--smoke", "--workers", "1", "--out", str(out)]) == 0
    return bench, out, json.loads((out / "personalization_dev.json").read_text())


def test_table_has_every_variant_over_both_concepts(smoke):
    bench, out, report = smoke
    assert report["concept_set"] == "dev"
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
    # base model per concept + 4 variants x 2 concepts + one tracked/untracked timing pair
    assert len(files) == 2 + 4 * 2 + 2
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
    # the baseline observes DVAR the whole way (never stopping) and its DVAR run is cut from it
    assert baseline["series"]["eval_steps"] == list(range(1, baseline["steps"] + 1))
    assert baseline["dvar_stop"]["steps"] == dvar["steps"] and dvar["derived_from"] == "baseline"
    assert series["deterministic_loss"] == baseline["series"]["deterministic_loss"][: dvar["steps"]]


def test_gain_kept_and_target_are_computed_from_the_runs(smoke):
    bench, out, report = smoke
    entry = report["table"]["textualInversion"]
    base = report["base"]
    kept = []
    for concept in report["concepts"]:
        baseline_gain = entry["baseline"]["per_concept"][concept]["clip_i"] - base[concept]["clip_i"]
        dvar_gain = entry["dvar"]["per_concept"][concept]["clip_i"] - base[concept]["clip_i"]
        if baseline_gain >= bench.MIN_JUDGED_GAIN:  # smaller gains are CLIP-I noise: not judged
            kept.append(dvar_gain / baseline_gain)
    # The headline numbers are only computed over judged concepts; the smoke run's red striped
    # triangle gains about 0.09 CLIP-I in its 10 steps, three times MIN_JUDGED_GAIN.
    assert kept, f"the smoke run judged no concept (baseline gains under {bench.MIN_JUDGED_GAIN})"
    vs = entry["dvar"]["vs_baseline"]
    assert vs["median_gain_kept"] == pytest.approx(statistics.median(kept))
    assert vs["min_gain_kept"] == pytest.approx(min(kept))
    assert vs["concepts_without_baseline_gain"] == len(report["concepts"]) - len(kept)
    plateau_kept = []  # the second reading: against the mean of the baseline's last curve scores
    for concept in report["concepts"]:
        run = json.loads((out / "personalization_runs" / f"textualInversion_baseline_{concept}.json").read_text())
        baseline_gain = run["clip_i"] - base[concept]["clip_i"]
        if baseline_gain >= bench.MIN_JUDGED_GAIN:
            plateau = statistics.fmean(run["series"]["curve_clip_i"][-bench.PLATEAU_POINTS:]) - base[concept]["clip_i"]
            plateau_kept.append((entry["dvar"]["per_concept"][concept]["clip_i"] - base[concept]["clip_i"]) / plateau)
    assert len(plateau_kept) == len(kept)
    assert vs["median_gain_kept_vs_plateau"] == pytest.approx(statistics.median(plateau_kept))
    target = report["target"]["textualInversion"]
    assert target["met"] == (
        target["gain_kept_at_least_90pct"] and target["no_concept_under_70pct"] and target["steps_at_most_one_third"]
        and target["clip_t_within_spread"]
    )
    md = (out / "personalization_dev.md").read_text()
    for variant in bench.VARIANTS:
        assert f"| textualInversion | {variant} |" in md


def test_run_files_keep_each_timesteps_L_det_the_step_statistics_and_the_embedding(smoke):
    """The stop-signal candidates replay from these: L_det per reference slot at every evaluation
    (its mean is the run's L_det), each training statistic at every step, and Textual Inversion's
    learned embedding every EMBEDDING_STRIDE steps."""
    bench, out, report = smoke
    runs = out / "personalization_runs"
    baseline = json.loads((runs / "textualInversion_baseline_red_striped_triangle.json").read_text())
    series, steps = baseline["series"], baseline["steps"]
    per_slot = series["timestep_losses"]
    assert len(per_slot) == 4 and all(label.startswith("t=") for label in per_slot)  # reference batch of 4
    for i, mean in enumerate(series["deterministic_loss"]):
        assert statistics.fmean(v[i] for v in per_slot.values()) == pytest.approx(mean, rel=1e-3)
    assert set(series["stats"]) == {"lr", "grad_norm", "update_ratio", "update_cosine", "adam_snr"}
    assert all(len(v) == steps for v in series["stats"].values())
    assert series["stats"]["update_cosine"][0] is None  # no earlier update at step 1
    assert all(v is not None and v > 0 for v in series["stats"]["grad_norm"])
    assert series["embedding_steps"] == list(range(bench.EMBEDDING_STRIDE, steps + 1, bench.EMBEDDING_STRIDE))
    assert len({len(e) for e in series["embedding"]}) == 1 and series["embedding"][0] != series["embedding"][-1]
    # the DVAR run cut from it keeps the same series up to its stop
    dvar = json.loads((runs / "textualInversion_dvar_red_striped_triangle.json").read_text())["series"]
    assert all(len(v) == len(dvar["eval_steps"]) for v in dvar["timestep_losses"].values())
    assert all(len(v) == baseline["dvar_stop"]["steps"] for v in dvar["stats"].values())


def test_dvar_run_cut_from_the_baseline_is_the_real_dvar_run(smoke, tmp_path):
    """What licenses deriving DVAR from the baseline: a real DVAR run (criterion dvar, stopping)
    trains, tracks and scores exactly like the baseline up to its stop step."""
    bench, out, report = smoke
    assert bench.main(["--smoke", "--workers", "1", "--out", str(tmp_path), "--variants", "dvar"]) == 0
    for concept in report["concepts"]:
        name = f"textualInversion_dvar_{concept}.json"
        derived = json.loads((out / "personalization_runs" / name).read_text())
        real = json.loads((tmp_path / "personalization_runs" / name).read_text())
        assert "derived_from" not in real
        for key in ("steps", "stop_reason", "clip_i", "clip_t", "series"):
            assert derived[key] == real[key], (concept, key)


def test_finished_runs_are_reused(smoke):
    bench, out, report = smoke
    cached = out / "personalization_runs" / "textualInversion_dvar_blue_dotted_star.json"
    record = json.loads(cached.read_text())
    record["clip_i"] = 0.123  # a value no rerun would produce: shows up only if the file is reused
    cached.write_text(json.dumps(record))
    assert bench.main(["--smoke", "--workers", "1", "--out", str(out), "--variants", "dvar,fewIterations"]) == 0
    again = json.loads((out / "personalization_dev.json").read_text())
    assert again["table"]["textualInversion"]["dvar"]["per_concept"]["blue_dotted_star"]["clip_i"] == 0.123
    assert list(again["table"]["textualInversion"]) == ["dvar", "fewIterations"]


def test_runs_of_another_world_are_not_reused(smoke):
    """A finished run names the world it trained on; after re-pretraining it is run again."""
    bench, out, report = smoke
    assert report["world"] == json.loads(
        (out / "personalization_runs" / "textualInversion_dvar_red_striped_triangle.json").read_text())["world"]
    cached = out / "personalization_runs" / "textualInversion_dvar_red_striped_triangle.json"
    record = json.loads(cached.read_text())
    record["clip_i"], record["world"] = 0.123, "another-world"
    cached.write_text(json.dumps(record))
    assert bench.main(["--smoke", "--workers", "1", "--out", str(out), "--variants", "dvar"]) == 0
    again = json.loads((out / "personalization_dev.json").read_text())
    assert again["table"]["textualInversion"]["dvar"]["per_concept"]["red_striped_triangle"]["clip_i"] != 0.123
    assert json.loads(cached.read_text())["world"] == report["world"]


def test_baseline_curve_ends_at_the_runs_final_score(smoke):
    """The curve is scored with the models being trained; its last point (the last step) is the
    same model state the run's final evaluation scores, so scoring mid-run did not change the run."""
    bench, out, report = smoke
    every, budget = bench.SMOKE["curve_every"], bench.SMOKE["max_steps"]
    for concept in report["concepts"]:
        run = json.loads((out / "personalization_runs" / f"textualInversion_baseline_{concept}.json").read_text())
        assert run["series"]["curve_steps"] == [*range(every, budget + 1, every), budget]
        assert run["series"]["curve_clip_i"][-1] == pytest.approx(run["clip_i"], abs=1e-4)


def test_stop_quality_compares_dvar_stops_with_the_baseline_s90(smoke):
    bench, out, report = smoke
    quality = report["stop_quality"]["textualInversion"]
    for concept, entry in quality["per_concept"].items():
        dvar = report["table"]["textualInversion"]["dvar"]["per_concept"][concept]
        assert entry["stop_step"] == dvar["steps"]
        curve = quality["curves"][concept]
        assert curve["steps"][0] == 0 and curve["gains"][0] == 0.0
        final_gain = report["table"]["textualInversion"]["baseline"]["per_concept"][concept]["clip_i"] - report["base"][concept]["clip_i"]
        assert curve["gains"][-1] == pytest.approx(final_gain, abs=1e-4)
        assert entry["s90"] == bench.stop_quality.s90(curve["steps"], curve["gains"])
    assert (out / "stop_quality_textualInversion.png").is_file()
    assert "## Stop quality" in (out / "personalization_dev.md").read_text()


def test_tracking_cost_pairs_a_tracked_and_an_untracked_run_of_the_same_steps(smoke):
    bench, out, report = smoke
    steps = bench.SMOKE["timing_steps"]
    runs = out / "personalization_runs"
    tracked = json.loads((runs / f"timing_textualInversion_tracked_{steps}_0_red_striped_triangle.json").read_text())
    untracked = json.loads((runs / f"timing_textualInversion_untracked_{steps}_0_red_striped_triangle.json").read_text())
    assert tracked["steps"] == untracked["steps"] == steps  # minSteps = maxSteps: DVAR tracks but never stops early
    assert len(tracked["step_seconds"]) == len(untracked["step_seconds"]) == steps
    cost = report["tracking_cost"]["textualInversion"]
    skip = cost["warmup_steps_skipped"]
    expected = (sum(tracked["step_seconds"][skip:]) / (steps - skip)) / (sum(untracked["step_seconds"][skip:]) / (steps - skip))
    assert cost["per_step"]["median_ratio"] == pytest.approx(expected, rel=1e-3)
    assert "## Tracking cost" in (out / "personalization_dev.md").read_text()



def test_refuses_concepts_the_world_was_pretrained_on(tmp_path, capsys):
    """Scores on a concept the model was pretrained on say nothing: every concept of the chosen
    set must be in the world's held-out record."""
    import shutil

    from personalize.world import provenance

    bench = load_benchmark()
    world = tmp_path / "world"  # a world whose pretraining held out only blue_dotted_star
    shutil.copytree(TINY_WORLD_DIR, world)
    (world / provenance.RECORD_FILE).write_text(json.dumps({"dev": ["blue_dotted_star"]}))
    assert bench.main(["--smoke", "--workers", "1", "--world", str(world), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: the tiny world {world} was pretrained on") and "red_striped_triangle" in error
    assert "blue_dotted_star" not in error
    assert not (tmp_path / "out" / "personalization_dev.json").exists()


def test_the_fresh_set_needs_a_world_that_held_it_out(tmp_path, capsys):
    """The installed world was pretrained before the fresh set existed, so it saw those concepts."""
    bench = load_benchmark()
    assert bench.main(["--smoke", "--workers", "1", "--set", "fresh", "--out", str(tmp_path / "out")]) == 2
    assert "red_striped_hexagon" in capsys.readouterr().err
    assert bench.main(["--smoke", "--workers", "1", "--world", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "not a pretrained tiny world" in capsys.readouterr().err


def test_another_world_trains_and_scores_the_runs(tmp_path):
    """--world DIR: the runs train that folder's pipeline and are scored by its CLIP, and the
    report names its weights."""
    import shutil

    from safetensors.torch import load_file, save_file

    from personalize.world import provenance
    from personalize.world.shapes import FRESH_CONCEPTS

    bench = load_benchmark()
    world = tmp_path / "world"
    shutil.copytree(TINY_WORLD_DIR, world)
    (world / provenance.RECORD_FILE).write_text(json.dumps({"fresh": [c.name for c in FRESH_CONCEPTS]}))
    clip_weights = next((world / "clip").glob("*.safetensors"))
    tensors = load_file(clip_weights)
    save_file({k: v * 1.01 if v.is_floating_point() else v for k, v in tensors.items()}, clip_weights)
    out = tmp_path / "out"
    argv = ["--smoke", "--workers", "1", "--set", "fresh", "--world", str(world), "--out", str(out),
            "--variants", "baseline", "--concepts", "1", "--timing-repeats", "0"]
    assert bench.main(argv) == 0
    report = json.loads((out / "personalization_fresh.json").read_text())
    assert report["world"] == provenance.world_fingerprint(world) != provenance.world_fingerprint(TINY_WORLD_DIR)
    run = report["table"]["textualInversion"]["baseline"]["per_concept"][FRESH_CONCEPTS[0].name]
    assert run["steps"] == bench.SMOKE["max_steps"]
    # Scored by this world's (altered) CLIP: the installed one gives another base score.
    bench.init_worker(str(tmp_path / "w"))
    installed = bench.base_scores(bench.Task("base", FRESH_CONCEPTS[0].name, eval_images_per_prompt=2,
                                             eval_inference_steps=3), tmp_path / "w")
    assert installed["clip_i"] != pytest.approx(report["base"][FRESH_CONCEPTS[0].name]["clip_i"], abs=1e-6)


def test_slot_study_scores_a_second_reference_batch_without_changing_the_run(smoke, tmp_path):
    """--setting METHOD.slot_study=N: the baseline also scores N reference slots, one loss per slot
    and step; its training, L_det and scores are the smoke baseline's (the study batch has its own
    generator), which is what lets reference_study.py read gains off the recorded curves."""
    bench, out, report = smoke
    runs = tmp_path / "personalization_runs"
    runs.mkdir()
    for base in (out / "personalization_runs").glob("base_*.json"):  # reused: no rescoring
        (runs / base.name).write_text(base.read_text())
    assert bench.main(["--smoke", "--workers", "1", "--out", str(tmp_path), "--variants", "baseline,dvar",
                       "--setting", "textualInversion.slot_study=3"]) == 0
    name = "textualInversion_baseline_red_striped_triangle.json"
    plain = json.loads((out / "personalization_runs" / name).read_text())
    study = json.loads((runs / name).read_text())
    assert "slots" not in plain
    assert len(study["slots"]["losses"]) == study["steps"] and {len(r) for r in study["slots"]["losses"]} == {3}
    assert len(set(study["slots"]["timesteps"])) == 3
    for key in ("series", "clip_i", "clip_t", "steps"):
        assert study[key] == plain[key], key

    reference_study = load_script("reference_study", "reference_study_under_test")
    baselines = reference_study.load_baselines(out / "personalization_runs", "textualInversion", report["concepts"])
    loaded = reference_study.load_study(runs, "textualInversion", baselines)
    assert sorted(loaded) == sorted(report["concepts"])
    result = reference_study.study_method("textualInversion", loaded, baselines)
    assert [r["timestep"] for r in result["by_slot"]] == sorted(study["slots"]["timesteps"])
    assert {k: r["subsets"] for k, r in result["by_size"].items()} == {1: 3, 2: 3}
    # Another CPU's rounding is the same training, also grown over a long run; another seed's
    # first steps are not.
    losses = [0.05 + 0.001 * (step % 7) for step in range(40)]
    assert reference_study.same_training([v * (1 + 2e-5) for v in losses], losses)
    assert reference_study.same_training(losses[:-1] + [losses[-1] * 1.005], losses)  # late drift
    assert not reference_study.same_training([v * 1.01 for v in losses], losses)
    assert not reference_study.same_training(losses[:-1], losses)


def test_timing_pairs_run_with_the_methods_reference_batch_settings():
    """--setting lora.reference_batch_size=2 times what a user with that setting would pay."""
    from argparse import Namespace

    bench = load_benchmark()
    args = Namespace(overrides={"lora": {"reference_batch_size": 2, "holdout": True}}, timing_repeats=2,
                     timing_steps=12, eval_options={})
    tasks = bench.timing_tasks("lora", "red_striped_triangle", args)
    assert [t.variant for t in tasks] == ["untracked", "tracked", "tracked", "untracked"]
    assert {(t.reference_batch_size, t.holdout, t.max_steps) for t in tasks} == {(2, True, 12)}
    assert {t.reference_batch_size for t in bench.timing_tasks("textualInversion", "red_striped_triangle", args)} == {4}


def test_concepts_are_chosen_by_count_or_by_name_within_the_set(tmp_path, capsys):
    bench = load_benchmark()
    names = ["red_striped_triangle", "blue_dotted_star", "pink_striped_heart"]
    assert bench.select_concepts(names, None) == names
    assert bench.select_concepts(names, "2") == names[:2]
    assert bench.select_concepts(names, "pink_striped_heart,red_striped_triangle,pink_striped_heart") == [
        "pink_striped_heart", "red_striped_triangle"]  # the order given, once each
    with pytest.raises(ValueError, match="orange_dotted_hexagon"):
        bench.select_concepts(names, "orange_dotted_hexagon")
    with pytest.raises(ValueError):
        bench.select_concepts(names, "0")
    # a test concept named on the dev set is refused before anything trains
    out = tmp_path / "out"
    assert bench.main(["--set", "dev", "--concepts", "orange_dotted_hexagon", "--workers", "1", "--out", str(out)]) == 2
    assert "not in this set: orange_dotted_hexagon" in capsys.readouterr().err
    assert not (out / "personalization_dev.json").exists()
