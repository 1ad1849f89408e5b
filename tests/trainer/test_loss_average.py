"""Data parallel with two gloo processes, which train on different batches (each its own seed):
the reported training loss is the mean of the processes' own losses, and every trained weight is
the same on both processes at the end (gradients averaged, also for weights accelerate does not
wrap, such as SDXL's second text encoder)."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from personalize.launcher import launch

from job_specs import job_spec
from test_cli import write_config

WORKER = Path(__file__).with_name("loss_average_worker.py")
REPLICA_WORKER = Path(__file__).with_name("replica_weights_worker.py")


def run_two_processes(spec: dict, worker: Path, tmp_path: Path, monkeypatch) -> tuple[Path, list, list]:
    """The job on 2 gloo processes of `worker`; its output folder and what each rank recorded."""
    config, out, records = write_config(tmp_path, spec), tmp_path / "out", tmp_path / "records"
    records.mkdir()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("PJ_NAME", raising=False)
    monkeypatch.delenv("PJ_NAMESPACE", raising=False)
    code = launch(["--config", str(config), "--output", str(out)], 2,
                  command=[sys.executable, str(worker), str(records)])
    assert code == 0
    return out, *(json.loads((records / f"rank{r}.json").read_text()) for r in (0, 1))


@pytest.mark.slow
def test_reported_training_loss_is_the_mean_over_processes(tiny_pipeline_dir, concept_dir, tmp_path, monkeypatch):
    spec = job_spec(tiny_pipeline_dir, concept_dir, "lora")
    spec["training"] = {**spec["training"], "maxSteps": 3}
    out, rank0, rank1 = run_two_processes(spec, WORKER, tmp_path, monkeypatch)
    assert len(rank0) == len(rank1) == 3  # one micro-batch per step on each process
    assert all(a != b for a, b in zip(rank0, rank1))  # different batches: the mean is not either one
    with (out / "losses.csv").open() as f:
        reported = [float(row["train_loss"]) for row in csv.DictReader(f)]
    means = [(a + b) / 2 for a, b in zip(rank0, rank1)]
    assert reported == pytest.approx(means, rel=1e-6)
    for own in (rank0, rank1):
        assert reported != pytest.approx(own, rel=1e-6)
    result = json.loads((out / "result.json").read_text())
    assert result["processes"] == 2
    assert result["trainLoss"] == pytest.approx(means[-1], rel=1e-6)


@pytest.mark.slow
def test_sdxl_textual_inversion_ends_with_the_same_weights_on_every_process(concept_dir, tmp_path, monkeypatch):
    import tiny_families

    folder = tiny_families.build_sdxl(tmp_path / "sdxl")
    spec = job_spec(folder, concept_dir, "textualInversion")
    spec["concept"] = {**spec["concept"], "token": "auto"}
    spec["training"] = {**spec["training"], "maxSteps": 3, "resolution": tiny_families.RESOLUTION.get("sdxl", 32)}
    spec["earlyStopping"] = {**spec["earlyStopping"], "criterion": "none"}
    spec["validation"] = {**spec["validation"], "prompts": []}
    _, rank0, rank1 = run_two_processes(spec, REPLICA_WORKER, tmp_path, monkeypatch)
    assert len(rank0) == 1 and len(rank0[0]) == 2  # one stage; an embedding table per text encoder
    assert rank0 == rank1
