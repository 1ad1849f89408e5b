"""benchmarks/packing.py walks the GPU benchmark's path at tiny size on the CPU: randomly
initialised SD 1.5 and SDXL architectures built from configs, packs against solo runs, a results
file with one row per (method, pack size) holding measured rates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_the_packing_benchmark_runs_the_gpu_path_at_tiny_size(model, tmp_path):
    out = tmp_path / "packing"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "packing.py"), "--model", model, "--size", "tiny",
                           "--methods", "lora", "--sizes", "1,2", "--steps", "2", "--output", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["model"] == model and [r["slots"] for r in record["rows"]] == [1, 2]
    for row in record["rows"]:
        assert row["conceptSteps"] == 2 * row["slots"]
        assert row["soloConceptStepsPerSecond"] > 0 and row["packConceptStepsPerSecond"] > 0
    assert "| lora | 2 |" in out.with_suffix(".md").read_text()


def test_the_models_own_batch_scaling_is_relative_to_one_concepts_batch():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import packing

    scaling = packing.model_scaling([1, 2], batch=1, repeats=1)
    assert set(scaling) == {1, 2} and scaling[1] == 1.0  # a pack of one is its own reference
    assert scaling[2] > 0  # a measured ratio (its size is machine-dependent: no timed assert)
