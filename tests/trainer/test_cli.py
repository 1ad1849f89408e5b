"""`personalize-train --config FILE --output DIR`: end to end on the tiny pipeline."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from personalize.run import main
from personalize.spec import RunResult

from job_specs import job_spec
from personalize.samples import label_height

OUTPUT_FILES = {"result.json", "losses.csv", "convergence.png", "samples_before.png", "samples.png"}


def write_config(tmp_path, spec: dict, manifest: bool = True):
    path = tmp_path / "job.yaml"
    data = {"apiVersion": "personalization.dvar.dev/v1alpha1", "kind": "PersonalizationJob",
            "metadata": {"name": "demo", "namespace": "default"}, "spec": spec} if manifest else spec
    path.write_text(yaml.safe_dump(data))
    return path


def read_losses(path):
    with path.open() as f:
        return list(csv.DictReader(f))


def test_cli_runs_textual_inversion_and_writes_every_output(tiny_pipeline_dir, concept_dir, tmp_path):
    spec = job_spec(tiny_pipeline_dir, concept_dir, "textualInversion")
    spec["training"]["maxSteps"] = 6
    spec["earlyStopping"] = {"window": 4, "evalEvery": 2, "referenceBatchSize": 2, "holdout": True}
    spec["validation"] = {"prompts": ["a photo of {token}", "{token} on grass"], "numImagesPerPrompt": 2, "inferenceSteps": 2}
    config, out = write_config(tmp_path, spec), tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PJ_NAME", None)
    proc = subprocess.run(
        [sys.executable, "-m", "personalize.cli", "--config", str(config), "--output", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert OUTPUT_FILES | {"learned_embeds.safetensors"} <= {p.name for p in out.iterdir()}
    assert "step 6/6" in proc.stdout
    [closing] = [line for line in proc.stdout.splitlines() if "stopped at step 6/6" in line]
    assert re.search(r"evaluating the stop signal took [\d.]+ s of [\d.]+ s \(\d+%\)", closing), closing

    rows = read_losses(out / "losses.csv")
    assert list(rows[0])[:4] == ["step", "train_loss", "deterministic_loss", "convergence_value"]
    assert sum(column.startswith("deterministic_loss[t=") for column in rows[0]) == 2  # one per reference slot
    assert [r["step"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    assert [bool(r["deterministic_loss"]) for r in rows] == [False, True] * 3  # evalEvery 2
    assert all(r["train_loss"] for r in rows)

    result = json.loads((out / "result.json").read_text())
    RunResult.model_validate(result)  # the status shape, camelCase on the wire, plus how it computed
    assert result["mixedPrecision"] == "no" and result["processes"] == 1
    assert result["identifier"].startswith("<")
    assert result["reference"] == {"size": 2, "subBatches": 1, "indices": result["reference"]["indices"],
                                   "holdout": True, "fixed": "11111", "evalEvery": 2}
    stop = result["earlyStop"]
    assert stop["step"] == 6 and stop["stepsSaved"] == 0 and stop["fractionSaved"] == 0.0
    assert stop["window"] == 2  # 4 steps at evalEvery 2
    assert result["artifact"]["files"] == ["learned_embeds.safetensors"]
    [stage] = result["stages"]  # its L_det evaluations are timed, and are part of the stage's time
    assert 0 < stage["trackingSeconds"] < stage["seconds"]
    assert result["deterministicLoss"] == pytest.approx(float(rows[-1]["deterministic_loss"]))
    assert Image.open(out / "samples.png").size == (64, 2 * (label_height(64) + 32))  # 2 labelled prompts x 2 images
    before, after = (np.asarray(Image.open(out / f), dtype=np.float32) for f in ("samples_before.png", "samples.png"))
    assert before.shape == after.shape and np.abs(after - before).mean() > 0  # same noise, trained weights


def test_early_stop_is_recorded_with_steps_saved(tiny_pipeline_dir, concept_dir, tmp_path):
    spec = job_spec(tiny_pipeline_dir, concept_dir, "lora")
    # A huge threshold: DVAR stops as soon as its window is full and minSteps is passed.
    spec["training"] = {"maxSteps": 20, "minSteps": 5, "batchSize": 1, "learningRate": 1e-3}
    spec["earlyStopping"] = {"window": 3, "threshold": 1e6, "referenceBatchSize": 2, "evalEvery": 1}
    out = tmp_path / "out"
    assert main(["--config", str(write_config(tmp_path, spec)), "--output", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    stop = result["earlyStop"]
    assert stop["stopped"] is True and stop["reason"] == "ConvergenceThreshold"
    assert stop["step"] == 5 and stop["stepsSaved"] == 15 and stop["fractionSaved"] == 0.75
    assert len(read_losses(out / "losses.csv")) == 5
    assert "pytorch_lora_weights.safetensors" in result["artifact"]["files"]


def test_dreambooth_with_prior_preservation_caches_class_images(tiny_pipeline_dir, concept_dir, tmp_path):
    spec = job_spec(tiny_pipeline_dir, concept_dir, "dreambooth")
    spec["priorPreservation"] = {"enabled": True, "numClassImages": 3, "inferenceSteps": 2}
    config, out = write_config(tmp_path, spec, manifest=False), tmp_path / "out"
    assert main(["--config", str(config), "--output", str(out)]) == 0
    class_dir = out / "class_images"
    images = sorted(class_dir.glob("class_*.png"))
    assert len(images) == 3 and (class_dir / "prompt.txt").read_text() == "a photo of a triangle"
    stamps = [p.stat().st_mtime_ns for p in images]
    assert (out / "pipeline" / "model_index.json").is_file()
    # A rerun (e.g. a restarted pod) reuses the cached class images instead of regenerating them.
    assert main(["--config", str(config), "--output", str(out)]) == 0
    assert [p.stat().st_mtime_ns for p in images] == stamps


def test_ti_dreambooth_reports_both_stages(tiny_pipeline_dir, concept_dir, tmp_path):
    spec = job_spec(tiny_pipeline_dir, concept_dir, "tiDreambooth")
    out = tmp_path / "out"
    assert main(["--config", str(write_config(tmp_path, spec)), "--output", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert [(s["name"], s["stopStep"]) for s in result["stages"]] == [("textualInversion", 2), ("dreambooth", 3)]
    assert result["earlyStop"]["stepsSaved"] == 0
    assert result["artifact"]["files"] == ["learned_embeds.safetensors", "pipeline"]
    assert [r["step"] for r in read_losses(out / "losses.csv")] == ["1", "2", "3", "4", "5"]


def test_clip_baseline_criterion_stops_when_clip_i_stops_improving(tiny_pipeline_dir, concept_dir, tmp_path):
    from transformers import CLIPImageProcessor

    from personalize.world.tiny_models import TinyConfig, build_clip

    clip_dir = tmp_path / "clip"
    build_clip(TinyConfig.test(), seed=0).save_pretrained(clip_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip_dir)
    spec = job_spec(tiny_pipeline_dir, concept_dir, "lora")
    spec["training"] = {"maxSteps": 10, "batchSize": 1}
    # epsilon 1.0: no check can improve by that much, so the second check is already stale.
    spec["earlyStopping"] = {"criterion": "clip", "referenceBatchSize": 2, "evalEvery": 1,
                             "clip": {"modelPath": str(clip_dir), "everySteps": 2, "patience": 1, "epsilon": 1.0,
                                      "numSamples": 2, "inferenceSteps": 2}}
    out = tmp_path / "out"
    assert main(["--config", str(write_config(tmp_path, spec)), "--output", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["earlyStop"]["reason"] == "ConvergenceThreshold" and result["earlyStop"]["step"] == 4
    rows = read_losses(out / "losses.csv")
    assert all(r["deterministic_loss"] for r in rows)  # L_det is still recorded for the plot
    assert [bool(r["convergence_value"]) for r in rows] == [False, False, False, True]  # CLIP-I gain at check 2


class RecordingReporter:
    def __init__(self):
        self.reports, self.closed = [], False

    def report(self, report, final=False):
        self.reports.append((report.to_api(), final))

    def close(self):
        self.closed = True


def test_status_reports_progress_and_a_final_decision_equal_to_result_json(
    tiny_pipeline_dir, concept_dir, tmp_path, monkeypatch
):
    import personalize.job_runner as job_runner

    reporter = RecordingReporter()
    monkeypatch.setattr(job_runner.StatusReporter, "from_env", classmethod(lambda cls: reporter))
    spec = job_spec(tiny_pipeline_dir, concept_dir, "lora")
    out = tmp_path / "out"
    assert main(["--config", str(write_config(tmp_path, spec)), "--output", str(out)]) == 0
    progress = [r for r, final in reporter.reports if not final]
    assert [r["progress"]["step"] for r in progress] == [1, 2, 3]
    final = [r for r, final in reporter.reports if final]
    assert len(final) == 1 and reporter.closed
    result = json.loads((out / "result.json").read_text())
    result.pop("wallSeconds"), final[0].pop("wallSeconds")
    assert result.pop("mixedPrecision") == "no" and result.pop("processes") == 1  # result.json only
    assert final[0] == result and final[0]["earlyStop"]["reason"] == "MaxSteps"


def test_a_failed_final_status_patch_keeps_the_result_and_exits_3(tiny_pipeline_dir, concept_dir, tmp_path,
                                                                 monkeypatch):
    import personalize.job_runner as job_runner
    from personalize.status_reporter import EXIT_STATUS_UNREPORTED, StatusReportError
    from pj_operator.names import EXIT_STATUS_UNREPORTED as OPERATOR_EXPECTS

    class DownAtTheEnd(RecordingReporter):
        def report(self, report, final=False):
            if final:
                raise StatusReportError("status patch failed after 6 attempt(s): HTTP 503")
            super().report(report, final)

    monkeypatch.setattr(job_runner.StatusReporter, "from_env", classmethod(lambda cls: DownAtTheEnd()))
    termination_log = tmp_path / "termination-log"
    monkeypatch.setenv("PJ_TERMINATION_LOG", str(termination_log))
    spec = job_spec(tiny_pipeline_dir, concept_dir, "lora")
    out = tmp_path / "out"
    assert main(["--config", str(write_config(tmp_path, spec)), "--output", str(out)]) == EXIT_STATUS_UNREPORTED
    assert EXIT_STATUS_UNREPORTED == OPERATOR_EXPECTS == 3
    result = json.loads((out / "result.json").read_text())
    assert result["earlyStop"]["reason"] == "MaxSteps"
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads(termination_log.read_text())["earlyStop"] == result["earlyStop"]


def test_status_reporter_without_cluster_access_is_a_clear_error(tiny_pipeline_dir, concept_dir, tmp_path,
                                                                 monkeypatch, capsys):
    monkeypatch.setenv("PJ_NAMESPACE", "default")
    monkeypatch.setenv("PJ_NAME", "demo")
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    spec = job_spec(tiny_pipeline_dir, concept_dir, "lora")
    assert main(["--config", str(write_config(tmp_path, spec)), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot reach the Kubernetes API")


@pytest.mark.slow
def test_two_processes_stop_together(tiny_pipeline_dir, concept_dir, tmp_path):
    """accelerate launch, 2 CPU processes (gloo): the main process decides, both stop at the same
    step (a process that kept training would block in the next broadcast: the run would hang)."""
    spec = job_spec(tiny_pipeline_dir, concept_dir, "lora")
    spec["training"] = {"maxSteps": 30, "minSteps": 4, "batchSize": 1, "learningRate": 1e-3}
    spec["earlyStopping"] = {"window": 3, "threshold": 1e6, "referenceBatchSize": 2, "holdout": True, "evalEvery": 1}
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no",
         "-m", "personalize.cli", "--config", str(write_config(tmp_path, spec)), "--output", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "result.json").read_text())
    assert result["earlyStop"]["step"] == 4 and result["earlyStop"]["reason"] == "ConvergenceThreshold"
    assert proc.stdout.count("stopped at step 4/30") == 1  # only the main process prints


def test_a_crash_mid_training_still_writes_result_json_as_failed(tiny_pipeline_dir, concept_dir, tmp_path, monkeypatch):
    import personalize.loop as loop
    from personalize.loop import TrainingDiverged

    real = loop.diffusion_loss
    calls = []

    def diverging(*args, **kwargs):  # the third training step's loss is NaN
        if torch.is_inference_mode_enabled():  # L_det (the loop evaluates it with the same loss)
            return real(*args, **kwargs)
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(loop, "diffusion_loss", diverging)
    spec = job_spec(tiny_pipeline_dir, concept_dir, "lora")
    spec["training"]["maxSteps"] = 5
    out = tmp_path / "out"
    with pytest.raises(TrainingDiverged, match="at step 3"):
        main(["--config", str(write_config(tmp_path, spec)), "--output", str(out)])
    result = json.loads((out / "result.json").read_text())
    assert result["earlyStop"] == {"stopped": False, "reason": "Failed"}
    assert result["progress"]["step"] == 2 and "TrainingDiverged" in result["message"]


def test_after_training_hook_gets_the_trained_models_and_the_loss_rows(tiny_pipeline_dir, concept_dir, tmp_path):
    from personalize.job_runner import JobRunner
    from personalize.spec import parse_job

    spec = job_spec(tiny_pipeline_dir, concept_dir, "lora")
    spec["training"]["maxSteps"] = 3
    seen = []

    def after_training(trained):
        lora = [n for n, p in trained.models.unet.named_parameters() if "lora" in n and p.requires_grad]
        seen.append((trained.identifier_token, [r["step"] for r in trained.loss_rows], len(lora),
                     trained.models.unet.training, [o.stop_step for o in trained.outcomes]))

    job = parse_job({"apiVersion": "personalization.dvar.dev/v1alpha1", "kind": "PersonalizationJob",
                     "metadata": {"name": "demo", "namespace": "default"}, "spec": spec})
    out = tmp_path / "out"
    out.mkdir()
    assert JobRunner(job, out, after_training=after_training, sample_grids=False).execute() == 0
    result = json.loads((out / "result.json").read_text())
    assert seen == [(result["identifier"], [1, 2, 3], seen[0][2], False, [3])] and seen[0][2] > 0
    written = {p.name for p in out.iterdir()}
    assert "samples.png" not in written and "samples_before.png" not in written and "result.json" in written


def test_after_step_hook_sees_every_step_of_every_stage_with_the_models_as_they_are(tiny_pipeline_dir, concept_dir, tmp_path):
    """Two stages (2 + 3 steps): the hook's step counts on over the stage boundary, and it gets the
    very models after_training gets, as they are at that step (the UNet frozen in eval mode while
    stage 1 learns the embedding, training in stage 2)."""
    from personalize.job_runner import JobRunner
    from personalize.spec import parse_job

    spec = job_spec(tiny_pipeline_dir, concept_dir, "tiDreambooth")
    steps, final = [], []

    def after_step(trained):
        steps.append((trained.step, trained.identifier_token, trained.models.unet.training, trained.seconds >= 0))
        final.append(trained.models)

    def after_training(trained):
        final.append(trained.models)

    job = parse_job({"apiVersion": "personalization.dvar.dev/v1alpha1", "kind": "PersonalizationJob",
                     "metadata": {"name": "demo", "namespace": "default"}, "spec": spec})
    out = tmp_path / "out"
    out.mkdir()
    assert JobRunner(job, out, after_step=after_step, after_training=after_training, sample_grids=False).execute() == 0
    result = json.loads((out / "result.json").read_text())
    token = result["identifier"]
    assert [s[0] for s in steps] == [1, 2, 3, 4, 5]
    assert [s[2] for s in steps] == [False, False, True, True, True]
    assert {(s[1], s[3]) for s in steps} == {(token, True)}
    assert all(models is final[-1] for models in final)


def test_grids_while_training_trackers_and_a_log_line_every_n_steps(tiny_pipeline_dir, concept_dir, tmp_path):
    pytest.importorskip("tensorboard")
    spec = job_spec(tiny_pipeline_dir, concept_dir, "lora", reporting={"trackers": ["tensorboard"], "logEverySteps": 3})
    spec["training"]["maxSteps"] = 7
    spec["earlyStopping"] = {"criterion": "none", "referenceBatchSize": 2}
    spec["validation"] = {"prompts": ["a photo of {token}"], "numImagesPerPrompt": 1, "inferenceSteps": 2,
                          "everySteps": 3}
    config, out = write_config(tmp_path, spec), tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PJ_NAME", None)
    proc = subprocess.run([sys.executable, "-m", "personalize.cli", "--config", str(config), "--output", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    logged = [int(line.split("/")[0].split()[-1]) for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert logged == [1, 4, 7]  # every 3 steps from the first, and the last
    assert re.search(r"samples while training took [\d.]+ s", proc.stdout)
    # every 3 steps, and at the stop (step 7: the final grid)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-00003.png", "step-00006.png", "step-00007.png"]
    assert (out / "samples" / "step-00007.png").read_bytes() == (out / "samples.png").read_bytes()
    result = json.loads((out / "result.json").read_text())
    assert result["samples"] == "samples/step-00007.png" and result["sampleSeconds"] > 0
    progress = result["progress"]
    assert progress["step"] == 7 and "etaSeconds" not in progress and "eta" not in progress and progress["elapsed"]
    assert list((out / "trackers" / "tensorboard").rglob("events.out.tfevents.*"))
