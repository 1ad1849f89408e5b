"""With several processes the reported training loss is the mean of the processes' own losses:
two gloo processes train on different batches (each its own seed), so their local losses differ,
and losses.csv and result.json's trainLoss hold their mean at every step."""

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


@pytest.mark.slow
def test_reported_training_loss_is_the_mean_over_processes(tiny_pipeline_dir, concept_dir, tmp_path, monkeypatch):
    spec = job_spec(tiny_pipeline_dir, concept_dir, "lora")
    spec["training"] = {**spec["training"], "maxSteps": 3}
    config, out, local = write_config(tmp_path, spec), tmp_path / "out", tmp_path / "local"
    local.mkdir()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("PJ_NAME", raising=False)
    monkeypatch.delenv("PJ_NAMESPACE", raising=False)

    code = launch(["--config", str(config), "--output", str(out)], 2,
                  command=[sys.executable, str(WORKER), str(local)])

    assert code == 0
    rank0 = json.loads((local / "rank0.json").read_text())
    rank1 = json.loads((local / "rank1.json").read_text())
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
