"""Packed training: concepts that share a base model train in one batch, each as it would alone.

Every comparison is against the same manifest run solo (`JobRunner`), in fp32 on the CPU:
the L_det series, the stop step and the artifacts. A concept in a pack shares the denoiser's
forward with other rows, so its numbers may differ from its solo run's by float rounding only.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from job_specs import job_spec

CONCEPTS = ["red_striped_triangle", "blue_dotted_star", "yellow_checkered_circle", "green_striped_hexagon"]
# How far a packed concept's artifact may be from its solo run's (max abs difference over max abs).
# AdamW's first steps divide each gradient element by its own magnitude, so elements with gradients
# near zero (LoRA's B starts at zero) move by up to the learning rate on a rounding difference of
# the denoiser's forward over a larger batch (~1e-7 relative). Measured here in packs of 2: LoRA
# 3.6e-3, Custom Diffusion 1.5e-3, while their L_det series agree to 1e-4; Textual Inversion 1e-6.
# A pack of one equals its solo run to 1e-6 for every method.
ARTIFACT_TOLERANCE = {"textualInversion": 1e-4, "lora": 1e-2, "customDiffusion": 1e-2}
ARTIFACT = {"textualInversion": "learned_embeds.safetensors", "lora": "pytorch_lora_weights.safetensors",
            "customDiffusion": "pytorch_custom_diffusion_weights.safetensors"}


@pytest.fixture(scope="module")
def concept_dirs(tmp_path_factory) -> list[Path]:
    from personalize.world import concept_by_name, write_concept_images

    root = tmp_path_factory.mktemp("pack-concepts")
    return [write_concept_images(concept_by_name(n), 4, root / n, seed=i) and root / n for i, n in enumerate(CONCEPTS)]


def manifest(name: str, spec: dict) -> dict:
    return {"apiVersion": "personalization.dvar.dev/v1alpha1", "kind": "PersonalizationJob",
            "metadata": {"name": name}, "spec": spec}


def member_specs(pipeline: Path, concepts: list[Path], method: str, n: int) -> dict[str, dict]:
    """n concepts that differ in learning rate, batch size, maxSteps, seed and criterion."""
    specs = {}
    for i in range(n):
        spec = job_spec(pipeline, concepts[i], method, validation={"prompts": []})
        # explicit tokens: an auto token depends on which tokens the other concepts took
        spec["concept"]["token"] = f"<c{i}>" if method != "lora" else "sks"
        spec["training"] = {"maxSteps": 8 + 3 * i, "batchSize": 1 + i % 3, "learningRate": 2e-2 / (1 + i), "seed": i}
        spec["earlyStopping"] = {"criterion": "none" if i == 3 else "dvar", "window": 4 + i, "threshold": 0.3,
                                 "referenceBatchSize": 2, "evalEvery": 1}  # every step: the series to compare
        specs[f"c{i}"] = manifest(f"c{i}", spec)
    return specs


def write_jobs(folder: Path, manifests: dict[str, dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, m in manifests.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(m))
    return folder


def run_solo(manifest_dict: dict, output: Path) -> Path:
    from personalize.job_runner import JobRunner
    from personalize.preflight import preflight
    from personalize.spec import parse_job

    job = parse_job(manifest_dict)
    assert JobRunner(job, preflight(job, output)).execute() == 0
    return output


def run_pack(jobs: Path, output: Path, runner_class=None, **kwargs) -> dict:
    from personalize.packing import PackRunner

    (runner_class or PackRunner)(jobs, output, **kwargs).run()
    return json.loads((output / "pack.json").read_text())


def det_series(folder: Path) -> dict[int, float]:
    with open(folder / "losses.csv") as f:
        return {int(r["step"]): float(r["deterministic_loss"]) for r in csv.DictReader(f) if r["deterministic_loss"]}


def max_relative_error(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for k in a)


def artifact_error(a: Path, b: Path) -> float:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max() / y[k].abs().max().clamp_min(1e-12)) for k in x)


@pytest.mark.parametrize("method", ["textualInversion", "lora", "customDiffusion"])
def test_a_packed_concept_trains_as_it_would_alone(method, tiny_pipeline_dir, concept_dirs, tmp_path):
    manifests = member_specs(tiny_pipeline_dir, concept_dirs, method, 4)
    solo = {name: run_solo(m, tmp_path / "solo" / name) for name, m in manifests.items()}
    for size in (1, 2, 4):
        members = dict(list(manifests.items())[:size])
        out = tmp_path / f"pack{size}"
        record = run_pack(write_jobs(tmp_path / f"jobs{size}", members), out)
        assert record["conceptSteps"] == sum(s["steps"] for s in record["slots"])
        for slot in record["slots"]:
            name = slot["name"]
            mine, alone = out / name, solo[name]
            result, solo_result = (json.loads((d / "result.json").read_text()) for d in (mine, alone))
            assert slot["phase"] == "Succeeded" and slot["joinedAt"] == 0, slot["message"]
            assert slot["steps"] == result["earlyStop"]["step"] == solo_result["earlyStop"]["step"], (method, size, name)
            assert result["earlyStop"]["reason"] == solo_result["earlyStop"]["reason"]
            assert max_relative_error(det_series(mine), det_series(alone)) <= 1e-4, (method, size, name)
            error = artifact_error(mine / ARTIFACT[method], alone / ARTIFACT[method])
            assert error <= (ARTIFACT_TOLERANCE[method] if size > 1 else 1e-6), (method, size, name, error)
            assert sorted(p.name for p in mine.iterdir()) == sorted(p.name for p in alone.iterdir())


def test_a_manifest_that_arrives_mid_pack_joins_at_its_own_step_0(tiny_pipeline_dir, concept_dirs, tmp_path):
    from personalize.packing import PackRunner

    manifests = member_specs(tiny_pipeline_dir, concept_dirs, "textualInversion", 2)
    jobs = write_jobs(tmp_path / "jobs", {"c0": manifests["c0"]})

    class ArrivesAtStep3(PackRunner):
        def between_steps(self, pack, left):
            if self.record.step == 2:  # written while the pack trains: read at the next step boundary
                write_jobs(jobs, {"c1": manifests["c1"]})
            super().between_steps(pack, left)

    record = run_pack(jobs, tmp_path / "pack", ArrivesAtStep3)
    c1 = next(s for s in record["slots"] if s["name"] == "c1")
    assert c1["joinedAt"] == 3 and c1["phase"] == "Succeeded"
    alone = run_solo(manifests["c1"], tmp_path / "solo")
    assert max_relative_error(det_series(tmp_path / "pack" / "c1"), det_series(alone)) <= 1e-4
    assert c1["steps"] == json.loads((alone / "result.json").read_text())["earlyStop"]["step"]


def test_a_removed_manifest_leaves_as_cancelled_and_the_others_go_on(tiny_pipeline_dir, concept_dirs, tmp_path):
    from personalize.packing import PackRunner

    manifests = member_specs(tiny_pipeline_dir, concept_dirs, "lora", 2)
    for m in manifests.values():
        m["spec"]["earlyStopping"]["criterion"] = "none"
    jobs = write_jobs(tmp_path / "jobs", manifests)

    class RemovedAtStep2(PackRunner):
        def between_steps(self, pack, left):
            if self.record.step == 1:
                (jobs / "c0.yaml").unlink()
            super().between_steps(pack, left)

    record = run_pack(jobs, tmp_path / "pack", RemovedAtStep2)
    by_name = {s["name"]: s for s in record["slots"]}
    assert by_name["c0"]["phase"] == "Cancelled" and by_name["c0"]["steps"] == 2
    result = json.loads((tmp_path / "pack" / "c0" / "result.json").read_text())
    assert result["earlyStop"]["reason"] == "Cancelled" and result["progress"]["step"] == 2
    assert by_name["c1"]["phase"] == "Succeeded" and by_name["c1"]["steps"] == manifests["c1"]["spec"]["training"]["maxSteps"]


def test_manifests_that_cannot_join_fail_alone_with_the_reason(tiny_pipeline_dir, concept_dirs, tmp_path):
    good = member_specs(tiny_pipeline_dir, concept_dirs, "textualInversion", 1)["c0"]
    dreambooth = manifest("db", job_spec(tiny_pipeline_dir, concept_dirs[1], "dreambooth"))
    other_resolution = manifest("res", {**good["spec"], "training": {**good["spec"]["training"], "resolution": 16}})
    bad_input = manifest("bad", {**good["spec"], "concept": {**good["spec"]["concept"], "images": {"path": str(tmp_path / "none")}}})
    jobs = write_jobs(tmp_path / "jobs", {"a-good": good, "db": dreambooth, "res": other_resolution, "bad": bad_input})
    (jobs / "dup.yaml").write_text(yaml.safe_dump(manifest("c0", good["spec"])))  # a second file named c0
    (jobs / "broken.yaml").write_text("spec: [unclosed\n")
    record = run_pack(jobs, tmp_path / "pack")
    by_name = {s["name"]: s for s in record["slots"]}
    assert by_name["c0"]["phase"] == "Succeeded"
    messages = {name: json.loads((tmp_path / "pack" / name / "result.json").read_text())["message"]
                for name in ("db", "res", "bad", "dup", "broken")}
    assert all(by_name[name]["phase"] == "Failed" for name in messages)
    assert "dreambooth" in messages["db"] and "solo" in messages["db"]
    assert "training.resolution" in messages["res"]
    assert "duplicate name 'c0'" in messages["dup"]
    assert str(tmp_path / "none") in messages["bad"]  # the error a solo run gives
    assert "\n" not in "".join(messages.values())


def test_pack_command_line_refuses_a_missing_folder(tmp_path, capsys):
    from personalize.cli import main

    assert main(["pack", "--jobs", str(tmp_path / "missing"), "--output", str(tmp_path / "out")]) == 2
    assert "error:" in capsys.readouterr().err


def test_pack_command_line_refuses_several_processes(tmp_path, capsys, monkeypatch):
    from personalize.cli import main

    (tmp_path / "jobs").mkdir()
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun every rank would train every member
    assert main(["pack", "--jobs", str(tmp_path / "jobs"), "--output", str(tmp_path / "out")]) == 2
    assert "runs in one process" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_members_failing_step_callback_fails_it_alone(tiny_pipeline_dir, concept_dirs, tmp_path, monkeypatch):
    """Its log line, metrics, trackers or samples raise (say a grid out of memory): it fails, the rest go on."""
    from personalize.job_runner import JobRunner

    on_step = JobRunner._on_step

    def failing_for_c1(self, *args, **kwargs):
        callback = on_step(self, *args, **kwargs)
        if self.output.name != "c1":
            return callback

        def callback_that_fails(record):
            if record.step == 2:
                raise RuntimeError("the sample grid ran out of memory")
            return callback(record)
        return callback_that_fails

    monkeypatch.setattr(JobRunner, "_on_step", failing_for_c1)
    manifests = member_specs(tiny_pipeline_dir, concept_dirs, "textualInversion", 2)
    record = run_pack(write_jobs(tmp_path / "jobs", manifests), tmp_path / "pack")
    slots = {s["name"]: s for s in record["slots"]}
    assert slots["c1"]["phase"] == "Failed" and "ran out of memory" in slots["c1"]["message"]
    assert json.loads((tmp_path / "pack" / "c1" / "result.json").read_text())["earlyStop"]["reason"] == "Failed"
    assert slots["c0"]["phase"] == "Succeeded" and slots["c0"]["steps"] >= 3


class StopRequest:
    """What GracefulShutdown gives the checkpoints: a flag the test raises at a chosen step."""

    requested = False
    signal_name = "SIGTERM"


def test_a_pack_stopped_mid_run_resumes_every_slot_where_it_would_have_stopped(tiny_pipeline_dir, concept_dirs, tmp_path):
    from personalize.packing import PackRunner
    from personalize.shutdown import TrainingInterrupted

    manifests = member_specs(tiny_pipeline_dir, concept_dirs, "textualInversion", 3)
    manifests["c0"]["spec"]["training"]["maxSteps"] = 3  # leaves before the interruption
    # auto tokens: c2's avoids c0's, which is gone after the restart; c2 must keep the one it trains
    manifests["c0"]["spec"]["concept"]["token"] = manifests["c2"]["spec"]["concept"]["token"] = "auto"
    straight = run_pack(write_jobs(tmp_path / "jobs-straight", manifests), tmp_path / "straight")
    jobs = write_jobs(tmp_path / "jobs", manifests)
    shutdown = StopRequest()

    class StoppedAtStep5(PackRunner):
        def between_steps(self, pack, left):
            super().between_steps(pack, left)
            shutdown.requested = self.record.step == 4  # seen by the checkpoints after step 5

    with pytest.raises(TrainingInterrupted):
        StoppedAtStep5(jobs, tmp_path / "pack", shutdown=shutdown).run()
    interrupted = json.loads((tmp_path / "pack" / "pack.json").read_text())
    assert {s["name"]: s["phase"] for s in interrupted["slots"]} == {"c0": "Succeeded", "c1": "Running", "c2": "Running"}
    assert (tmp_path / "pack" / "c1" / "checkpoints").is_dir()
    done_before = (tmp_path / "pack" / "c0" / "result.json").stat().st_mtime_ns

    resumed = run_pack(jobs, tmp_path / "pack")  # the same command again
    assert (tmp_path / "pack" / "c0" / "result.json").stat().st_mtime_ns == done_before  # not trained again
    for slot, alone in zip(resumed["slots"], straight["slots"]):
        assert (slot["name"], slot["phase"], slot["steps"], slot["stopReason"], slot["token"]) == \
               (alone["name"], alone["phase"], alone["steps"], alone["stopReason"], alone["token"])
        assert max_relative_error(det_series(tmp_path / "pack" / slot["name"]),
                                  det_series(tmp_path / "straight" / slot["name"])) <= 1e-6


def test_one_metrics_endpoint_carries_every_member_and_the_pack(tiny_pipeline_dir, concept_dirs, tmp_path):
    from prometheus_client import generate_latest

    from personalize.packing import PackRunner

    manifests = member_specs(tiny_pipeline_dir, concept_dirs, "lora", 2)
    runner = PackRunner(write_jobs(tmp_path / "jobs", manifests), tmp_path / "pack")
    runner.run()
    text = generate_latest(runner.metrics).decode()
    for name in manifests:
        assert f'personalization_step{{criterion="dvar",method="lora",namespace="",personalizationjob="{name}"}}' in text
    assert text.count("# HELP personalization_step ") == 1  # one family, one series per member
    assert 'personalization_pack_slots{state="free"} 8.0' in text
    steps = sum(s["steps"] for s in json.loads((tmp_path / "pack" / "pack.json").read_text())["slots"])
    assert f"personalization_pack_concept_steps_total {float(steps)}" in text


def test_a_member_that_left_goes_from_metrics_after_the_linger(tiny_pipeline_dir, concept_dirs, tmp_path):
    """A long-lived pack does not pile up departed members' series: each stays for the linger
    (so scrapes see its last values), then goes, as a solo run's go with its pod."""
    from prometheus_client import generate_latest

    from personalize.packing import PackRunner

    manifests = member_specs(tiny_pipeline_dir, concept_dirs, "textualInversion", 2)
    manifests["c0"]["spec"]["training"]["maxSteps"] = 2  # leaves while c1 trains on
    seen, now = {}, [0.0]

    class Watched(PackRunner):
        def between_steps(self, pack, left):
            super().between_steps(pack, left)
            text = generate_latest(self.metrics).decode()
            seen[self.record.step] = {name for name in manifests if f'personalizationjob="{name}"' in text}
            if self.record.step == 3:
                now[0] = 60.0  # the next scrape comes after the linger

    runner = Watched(write_jobs(tmp_path / "jobs", manifests), tmp_path / "pack", metrics_linger=50.0)
    runner.metrics.clock = lambda: now[0]
    runner.run()
    assert seen[2] == seen[3] == {"c0", "c1"}  # c0 left after step 2: still there within its linger
    assert seen[4] == {"c1"}  # its linger over: gone, c1 still reported
    assert 'personalization_pack_slots{state="free"}' in generate_latest(runner.metrics).decode()


def test_a_token_a_departed_member_trained_can_be_trained_again(tiny_pipeline_dir, concept_dirs, tmp_path):
    """The shared tokenizer keeps a member's new token after it left (it cannot drop one). A later
    member asking for the same token waits while the first trains, then trains it afresh: from
    the initializer, as it would alone, not from the first member's embedding."""
    manifests = member_specs(tiny_pipeline_dir, concept_dirs, "textualInversion", 2)
    for m in manifests.values():
        m["spec"]["concept"]["token"] = "<same>"
    manifests["c0"]["spec"]["training"]["maxSteps"] = 3
    record = run_pack(write_jobs(tmp_path / "jobs", manifests), tmp_path / "pack")
    by_name = {s["name"]: s for s in record["slots"]}
    assert by_name["c0"]["phase"] == "Succeeded" and by_name["c0"]["steps"] == 3
    assert by_name["c1"]["phase"] == "Succeeded", by_name["c1"]["message"]
    assert by_name["c1"]["joinedAt"] == 3  # it waited for c0's token to be free
    alone = run_solo(manifests["c1"], tmp_path / "solo")
    assert max_relative_error(det_series(tmp_path / "pack" / "c1"), det_series(alone)) <= 1e-4
    assert artifact_error(tmp_path / "pack" / "c1" / ARTIFACT["textualInversion"],
                          alone / ARTIFACT["textualInversion"]) <= ARTIFACT_TOLERANCE["textualInversion"]
