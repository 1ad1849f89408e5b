"""What a user sees of a running job, fed with StepRecords whose per-timestep losses and training
statistics are set: losses.csv, the status and result.json, the metrics, the trackers and the
grids drawn while training."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from PIL import Image

from job_specs import job_spec
from personalize.job_runner import JobRunner, make_job_accelerator
from personalize.loop import StepRecord
from personalize.methods import plan_stages
from personalize.metrics import TrainerMetrics
from personalize.reporting.status_view import ended_progress, running_progress
from personalize.reporting.step_samples import StepSamples
from personalize.reporting.trackers import Trackers
from personalize.run_files import write_losses_csv
from personalize.spec import CriterionName, EarlyStop, PersonalizationJob, StopReason, Tracker, parse_spec

STATS = {"lr": 5e-3, "grad_norm": 0.7, "update_ratio": 1e-3, "update_cosine": math.nan, "adam_snr": 0.2}


def records() -> list[StepRecord]:
    """Three steps; L_det (and its timesteps) evaluated at the first and the third."""
    return [
        StepRecord(1, 0.30, 0.050, None, 0.1, 0.02, {"t=0017": 0.09, "t=0911": 0.01}, STATS),
        StepRecord(2, 0.25, None, None, 0.1, None, None, {**STATS, "update_cosine": 0.4}),
        StepRecord(3, 0.20, 0.046, 0.41234567, 0.1, 0.02, {"t=0017": 0.082, "t=0911": 0.0101}, None),
    ]


@pytest.fixture
def runner(tmp_path, tiny_pipeline_dir, concept_dir):
    spec = parse_spec(job_spec(tiny_pipeline_dir, concept_dir, "textualInversion"))
    runner = JobRunner(PersonalizationJob(spec=spec), tmp_path)
    runner.accelerator = make_job_accelerator(runner.job)
    runner.metrics = TrainerMetrics("team-a", "cat", "textualInversion", "dvar")
    runner.reporter = None
    runner.stages = plan_stages(spec)
    return runner


def test_a_step_reaches_losses_csv_the_status_and_the_metrics(runner, tmp_path):
    stage = runner.stages[0]
    printer = runner.printer(stage)
    on_step = runner._on_step(stage, 10, printer, None, 32)
    for record in records():
        on_step(record)
    write_losses_csv(runner.rows, tmp_path / "losses.csv")
    with (tmp_path / "losses.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "train_loss", "deterministic_loss", "convergence_value",
                             "deterministic_loss[t=0017]", "deterministic_loss[t=0911]", *STATS]
    assert [r["step"] for r in rows] == ["11", "12", "13"]  # after the earlier stages' 10 steps
    assert [r["deterministic_loss[t=0017]"] for r in rows] == ["0.09", "", "0.082"]
    assert [r["update_cosine"] for r in rows] == ["", "0.4", ""]  # NaN (undefined) and None (not measured): empty
    assert [r["grad_norm"] for r in rows] == ["0.7", "0.7", ""]

    report = runner.report.to_api()
    assert report["timestepLosses"] == {"t=0017": 0.082, "t=0911": 0.0101}
    assert report["convergenceValue"] == 0.4123 and report["convergenceThreshold"] == stage.threshold
    progress = report["progress"]
    assert progress["step"] == 3 and progress["elapsed"].count(":") == 2 and progress["eta"].count(":") == 2

    text = runner.metrics.exposition().decode()
    assert 'personalization_timestep_deterministic_loss{criterion="dvar",method="textualInversion",' \
           'namespace="team-a",personalizationjob="cat",timestep="t=0911"} 0.0101' in text
    assert "personalization_update_cosine{" in text and "personalization_learning_rate{" in text


def test_the_status_of_an_ended_run_says_where_it_stopped_and_leaves_no_eta():
    running = running_progress(850, 6100, 2900.0, 412.0)
    assert running.eta == "0:48:20" and running.elapsed == "0:06:52" and running.percent == pytest.approx(13.93)
    ended = ended_progress(running, 413.5)
    assert ended.step == 850 and ended.percent == running.percent
    assert ended.eta_seconds is None and ended.eta is None and ended.elapsed == "0:06:54"
    assert "eta" not in ended.to_api() and "etaSeconds" not in ended.to_api()


def test_grids_are_due_every_n_steps_of_the_run_and_the_stop_copies_the_final_grid(tmp_path, tiny_pipeline_dir, concept_dir):
    spec = parse_spec(job_spec(tiny_pipeline_dir, concept_dir, "lora", validation={"everySteps": 50}))
    samples = StepSamples(spec, tmp_path)
    assert [s for s in range(1, 201) if samples.due(s)] == [50, 100, 150, 200]
    final = tmp_path / "samples.png"
    Image.new("RGB", (8, 8), "red").save(final)
    assert samples.at_stop(173, final) == "samples/step-00173.png"
    assert (tmp_path / "samples" / "step-00173.png").read_bytes() == final.read_bytes()
    off = StepSamples(parse_spec(job_spec(tiny_pipeline_dir, concept_dir, "lora")), tmp_path)
    assert not any(off.due(s) for s in range(1, 500)) and off.at_stop(3, final) is None


def event_scalars(folder: Path) -> tuple[dict[str, list[tuple[int, float]]], list[str], list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [run] = [p for p in folder.rglob("events.out.tfevents.*") if "hparams" not in str(p.parent.name)][:1]
    events = EventAccumulator(str(run.parent), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags["scalars"]}
    return scalars, tags["images"], tags["tensors"]


def test_tensorboard_gets_losses_timesteps_statistics_the_decision_and_the_grids(tmp_path, tiny_pipeline_dir, concept_dir):
    spec = parse_spec(job_spec(tiny_pipeline_dir, concept_dir, "lora", reporting={"trackers": ["tensorboard"]}))
    trackers = Trackers.from_spec(spec, tmp_path, "cat")
    for record in records():
        trackers.log_step(record.step, record, 0.15)
    grid = tmp_path / "samples.png"
    Image.new("RGB", (16, 24), "blue").save(grid)
    trackers.log_grid(3, grid)
    trackers.log_decision(EarlyStop(stopped=True, reason=StopReason.convergence_threshold,
                                    criterion=CriterionName.dvar, step=3, steps_saved=97))
    trackers.finish()
    scalars, images, tensors = event_scalars(tmp_path / "trackers" / "tensorboard")
    assert [s for s, _ in scalars["loss/train"]] == [1, 2, 3]
    assert [s for s, _ in scalars["loss/deterministic"]] == [1, 3]  # only where L_det was evaluated
    assert scalars["loss/deterministic_per_timestep/t_0911"] == [(1, pytest.approx(0.01)), (3, pytest.approx(0.0101))]
    assert [s for s, _ in scalars["stats/update_cosine"]] == [2]  # NaN and None left out
    assert scalars["convergence/value"] == [(3, pytest.approx(0.41234567))]
    assert scalars["convergence/threshold"][0] == (1, pytest.approx(0.15))
    assert scalars["stop/step"] == [(3, 3.0)] and scalars["stop/early"] == [(3, 1.0)]
    assert images == ["samples"]
    assert any(tag.startswith("stop/reason") for tag in tensors)  # text is stored as a tensor summary


def test_a_tracker_that_is_not_installed_fails_before_training_with_what_to_install(
        tmp_path, tiny_pipeline_dir, concept_dir, monkeypatch):
    from personalize.errors import TrainerInputError
    from personalize.reporting import trackers as trackers_module

    real = trackers_module._available
    monkeypatch.setattr(trackers_module, "_available", lambda tracker: tracker != Tracker.wandb and real(tracker))
    spec = parse_spec(job_spec(tiny_pipeline_dir, concept_dir, "lora", reporting={"trackers": ["tensorboard", "wandb"]}))
    with pytest.raises(TrainerInputError, match=r"^reporting.trackers: wandb not installed in the trainer's image; "
                                                r"install the extra personalization-job\[wandb\]$"):
        Trackers.from_spec(spec, tmp_path, "cat")
    assert not (tmp_path / "trackers").exists()  # refused before any tracker started


def log_a_short_run(trackers: Trackers, grid: Path) -> None:
    """Two steps (L_det, its timesteps and the statistics at both), a grid and the stop decision."""
    for record in records()[::2]:
        trackers.log_step(record.step, record, 0.15)
    Image.new("RGB", (16, 24), "blue").save(grid)
    trackers.log_grid(3, grid)
    trackers.log_decision(EarlyStop(stopped=True, reason=StopReason.convergence_threshold,
                                    criterion=CriterionName.dvar, step=3, steps_saved=97))
    trackers.finish()


@pytest.fixture(autouse=True)
def accelerate_state():
    """accelerate's trackers log through its logger, which needs the process state that a user's run
    has from its Accelerator; a test creates it itself rather than count on an earlier test's."""
    from accelerate import PartialState

    PartialState()


@pytest.fixture(autouse=True)
def no_mlflow_run_left_active():
    """A test that fails inside an MLflow run would leave it active for the next test's start."""
    yield
    import sys

    if "mlflow" in sys.modules:
        sys.modules["mlflow"].end_run()


def test_mlflow_gets_losses_timesteps_statistics_the_decision_and_the_grid_as_an_artifact(
        tmp_path, tiny_pipeline_dir, concept_dir, monkeypatch):
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    spec = parse_spec(job_spec(tiny_pipeline_dir, concept_dir, "lora",
                               reporting={"trackers": ["mlflow"], "project": "cats"}))
    log_a_short_run(Trackers.from_spec(spec, tmp_path / "out", "cat"), tmp_path / "samples.png")

    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("cats").experiment_id])
    assert run.info.run_name == "cat" and run.info.status == "FINISHED"

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))

    assert history("loss/train") == [(1, pytest.approx(0.30)), (3, pytest.approx(0.20))]
    assert history("loss/deterministic") == [(1, pytest.approx(0.050)), (3, pytest.approx(0.046))]
    assert history("loss/deterministic_per_timestep/t_0911") == [(1, pytest.approx(0.01)), (3, pytest.approx(0.0101))]
    assert history("stats/grad_norm") == [(1, pytest.approx(0.7))]
    assert history("convergence/value") == [(3, pytest.approx(0.41234567))]
    assert history("stop/step") == [(3, 3.0)] and history("stop/early") == [(3, 1.0)]
    assert history("stop/steps_saved") == [(3, 97.0)]
    assert run.data.params["method"] == "lora"  # the spec, stored as the run's parameters
    assert [a.path for a in client.list_artifacts(run.info.run_id, "samples")] == ["samples/samples.png"]
    assert not (tmp_path / "out" / "trackers" / "mlruns").exists()  # MLFLOW_TRACKING_URI chose the store


def test_mlflow_without_a_tracking_uri_keeps_its_runs_in_the_output(tmp_path, tiny_pipeline_dir, concept_dir, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    spec = parse_spec(job_spec(tiny_pipeline_dir, concept_dir, "lora", reporting={"trackers": ["mlflow"]}))
    log_a_short_run(Trackers.from_spec(spec, tmp_path, "cat"), tmp_path / "samples.png")
    client = MlflowClient((tmp_path / "trackers" / "mlruns").as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("personalization").experiment_id])
    assert [m.value for m in client.get_metric_history(run.info.run_id, "stop/early")] == [1.0]


def test_wandb_offline_gets_losses_timesteps_statistics_the_decision_and_the_grid(
        tmp_path, tiny_pipeline_dir, concept_dir, monkeypatch):
    """An offline run keeps its records in run-<id>.wandb, which only wandb-core reads (W&B 0.31 has
    no Python reader and writes no wandb-summary.json offline): the keys and the values, as the JSON
    text W&B stores them, are looked for in its bytes; the grid is a PNG among the run's media."""
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb-dir"), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "wandb-dir").mkdir()
    spec = parse_spec(job_spec(tiny_pipeline_dir, concept_dir, "lora", reporting={"trackers": ["wandb"]}))
    log_a_short_run(Trackers.from_spec(spec, tmp_path / "out", "cat"), tmp_path / "samples.png")

    [run] = (tmp_path / "out" / "trackers" / "wandb").glob("offline-run-*")  # the tracker's dir, not WANDB_DIR
    [records_file] = run.glob("run-*.wandb")
    stored = records_file.read_bytes()
    for text in ["loss/train", "loss/deterministic", "loss/deterministic_per_timestep/t_0911", "0.0101",
                 "stats/grad_norm", "convergence/value", "0.41234567", "stop/step", "stop/early",
                 "stop/steps_saved", "stop/reason", StopReason.convergence_threshold.value, "samples"]:
        assert text.encode() in stored, text
    [image] = (run / "files" / "media" / "images").glob("samples_3_*.png")  # logged at step 3
    with Image.open(image) as grid:
        assert grid.size == (16, 24)
