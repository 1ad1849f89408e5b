"""Bad input (issues 2 and 6): one line `error: ...` naming the problem, exit code 2, no traceback.

The cases are the trainer's rows of docs/bad-input.md (`trainer_bad_input_cases.py`). They run
in-process and none of them trains: every check fails before the first step, most before torch
is even imported.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from personalize.run import main

from job_specs import job_spec
from trainer_bad_input_cases import CASES, DOC, Case, Workspace, documented_rows, render_rows

BY_KEY = {case.key: case for case in CASES}


def prepared(case: Case, tmp_path, tiny_pipeline_dir, concept_dir) -> Workspace:
    ws = Workspace(tmp_path, job_spec(tiny_pipeline_dir, concept_dir, "textualInversion"), concept_dir, tiny_pipeline_dir)
    case.prepare(ws)
    if ws.write_config:
        ws.config.write_text(yaml.safe_dump(ws.spec))
    return ws


@pytest.mark.parametrize("case", CASES, ids=[c.key for c in CASES])
def test_bad_input_gives_one_clear_line_and_exit_2(case, tiny_pipeline_dir, concept_dir, tmp_path, capsys, monkeypatch):
    ws = prepared(case, tmp_path, tiny_pipeline_dir, concept_dir)
    for name in ws.unset_env:
        monkeypatch.delenv(name, raising=False)
    for name, value in ws.env.items():
        monkeypatch.setenv(name, value)
    try:
        code = main(ws.argv())
    finally:
        for close in ws.closers:
            close()
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2
    assert error_lines == [f"error: {ws.fill(case.message)}"], err
    assert err.rstrip().splitlines()[-1] == error_lines[0]  # nothing after it
    assert "Traceback" not in err
    assert not (ws.output / "result.json").exists()  # refused before training, not a failed run


def test_the_document_holds_exactly_these_rows():
    assert len(CASES) >= 20 and len({c.key for c in CASES}) == len(CASES)
    assert documented_rows(DOC.read_text()) == render_rows(), "run: python tests/operator/bad_input_cases.py"


@pytest.mark.parametrize("key", ["unknown-method", "images-missing"])  # caught before heavy imports
def test_cli_process_prints_only_the_error_line(key, tiny_pipeline_dir, concept_dir, tmp_path):
    case = BY_KEY[key]
    ws = prepared(case, tmp_path, tiny_pipeline_dir, concept_dir)
    env = dict(os.environ, OMP_NUM_THREADS="1", **ws.env)
    proc = subprocess.run([sys.executable, "-m", "personalize.cli", *ws.argv()],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {ws.fill(case.message)}"], proc.stderr
