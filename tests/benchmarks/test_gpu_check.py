"""benchmarks/gpu_check.sh reports failure by its exit code: a run that fails (here: a method the
trainer refuses, exit 2) makes the whole check exit 1, after saying which run failed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"


def run_check(tmp_path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable, "WORK": str(tmp_path / "work"), **env})


def test_a_failing_run_makes_the_check_exit_non_zero(tmp_path):
    proc = run_check(tmp_path, METHODS="noSuchMethod", MAX_STEPS="2")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL noSuchMethod-no-1p-cpu: exit code 2" in proc.stdout
    assert "1 failure(s)" in proc.stdout and "all runs passed" not in proc.stdout


def test_a_python_without_torch_makes_the_check_exit_non_zero(tmp_path):
    proc = run_check(tmp_path, PYTHON="false")
    assert proc.returncode == 1
    assert "cannot import torch" in proc.stdout
