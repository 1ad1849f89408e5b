"""Preemption end to end: the real `personalize-train` CLI is SIGTERMed in the middle of
a run, exits 143 with a checkpoint, and the same command resumes it. The resumed run must equal
an uninterrupted run of the same seed: losses.csv identical row for row (tolerance 0: on one CPU
process the resume is bit-exact, DVAR's window sums included), the same stop step, the same
result.json decision. Also: the termination message, a spec change and a corrupt checkpoint.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from artifact_files import artifact_content
from personalize.criteria import make_criterion
from personalize.run import main
from personalize.spec import RunResult, TrainerReport
from personalize.termination import MAX_BYTES, compact_report, write_termination_message


STEP_LINE = re.compile(r"step\s+(\d+)/")


def write_config(path: Path, concept_dir: Path, method: str, **training) -> Path:
    spec = {
        "baseModel": {"builtin": "tiny-world"},
        "method": method,
        "concept": {"images": {"path": str(concept_dir)}, "classNoun": "triangle", "token": "auto"},
        "training": {"maxSteps": 60, "batchSize": 2, "seed": 0, "checkpointEvery": 5,
                     "learningRate": 0.02 if method == "textualInversion" else 0.001, **training},
        "earlyStopping": {"criterion": "dvar", "window": 8, "threshold": 0.3, "evalEvery": 1, "referenceBatchSize": 2},
        "validation": {"numImagesPerPrompt": 1, "inferenceSteps": 2},
        # A progress line every step: the interrupt waits for the line of a given step.
        "reporting": {"logEverySteps": 1},
    }
    if method != "textualInversion":
        spec["priorPreservation"] = {"enabled": False}
    manifest = {"apiVersion": "personalization.dvar.dev/v1alpha1", "kind": "PersonalizationJob",
                "metadata": {"name": "resume", "namespace": "default"}, "spec": spec}
    path.write_text(yaml.safe_dump(manifest))
    return path


def trainer_env(termination_log: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PJ_TERMINATION_LOG=str(termination_log))
    env.pop("PJ_NAME", None)
    env.pop("PJ_NAMESPACE", None)
    return env


def command(config: Path, output: Path) -> list[str]:
    return [sys.executable, "-m", "personalize.cli", "--config", str(config), "--output", str(output)]


def run_until_sigterm(config: Path, output: Path, env: dict, at_step: int) -> tuple[int, str]:
    """Run the CLI, SIGTERM it once its progress line shows step >= at_step; (exit code, stdout)."""
    proc = subprocess.Popen(command(config, output), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    lines, sent = [], False
    for line in proc.stdout:
        lines.append(line)
        match = STEP_LINE.match(line)
        if not sent and match and int(match.group(1)) >= at_step:
            proc.send_signal(signal.SIGTERM)
            sent = True
    code = proc.wait(timeout=300)
    assert sent, "the run ended before reaching the interrupt step:\n" + "".join(lines[-20:])
    return code, "".join(lines)


def straight_beside_interrupted(config: Path, tmp_path: Path, at_step: int, timeout: int = 300) -> tuple[int, str]:
    """The uninterrupted run (into tmp_path/straight) and the run to be interrupted at `at_step`
    (into tmp_path/resumed) side by side, 2 cores; the straight run must succeed. Returns the
    interrupted run's (exit code, stdout)."""
    with (tmp_path / "straight.log").open("w") as log:
        straight = subprocess.Popen(command(config, tmp_path / "straight"), stdout=log, stderr=subprocess.STDOUT,
                                    env=trainer_env(tmp_path / "straight.termination"))
        code, stdout = run_until_sigterm(config, tmp_path / "resumed", trainer_env(tmp_path / "interrupted.termination"),
                                         at_step=at_step)
        assert straight.wait(timeout=timeout) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    return code, stdout


def read_rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def only_checkpoint(output: Path) -> tuple[Path, dict]:
    found = sorted((output / "checkpoints").glob("checkpoint-*"))
    assert len(found) == 1, found  # only the latest is kept
    return found[0], json.loads((found[0] / "state.json").read_text())


@pytest.mark.parametrize("method", ["textualInversion", "lora"])
def test_sigterm_then_resume_equals_an_uninterrupted_run(method, concept_dir, tmp_path, capsys):
    # LoRA warms its learning rate up past the interrupt step: the schedule's place must be restored too.
    schedule = {"lrScheduler": "constant_with_warmup", "lrWarmupSteps": 12} if method == "lora" else {}
    # minSteps: the run must go on well past the interrupt whatever step the world's DVAR would allow.
    config = write_config(tmp_path / "job.yaml", concept_dir, method, minSteps=14, **schedule)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    code, stdout = straight_beside_interrupted(config, tmp_path, at_step=7)

    # Interrupted: exit 143, one checkpoint of the step after which it stopped, no Failed anywhere.
    assert code == 143, stdout[-3000:]
    checkpoint, state = only_checkpoint(resumed)
    interrupted_at = state["step"]
    assert interrupted_at >= 7 and f"interrupted by SIGTERM after step {interrupted_at}" in stdout
    assert state["stage"] == method and len(state["loss_rows"]) == interrupted_at
    if method == "textualInversion":  # only the identifier's rows of the table (and their moments)
        assert (checkpoint / "trainable.safetensors").stat().st_size < 10_000
        assert (checkpoint / "optimizer.pt").stat().st_size < 20_000
    partial = RunResult.model_validate_json((resumed / "result.json").read_text())
    assert partial.early_stop is None and "interrupted by SIGTERM" in partial.message
    assert partial.progress.step == interrupted_at
    termination = TrainerReport.model_validate_json((tmp_path / "interrupted.termination").read_text())
    assert termination.early_stop is None and termination.progress.step == interrupted_at

    if method == "textualInversion":  # (in process, on the same checkpoint: cheaper than another run)
        check_refusals(config, resumed, checkpoint, tmp_path, capsys)

    # Resume with the same command: it continues after the checkpoint's step.
    proc = subprocess.run(command(config, resumed), capture_output=True, text=True,
                          env=trainer_env(tmp_path / "resumed.termination"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {checkpoint}" in proc.stderr
    first_step = int(STEP_LINE.search(proc.stdout).group(1))
    assert first_step == interrupted_at + 1

    # The same run: every row of losses.csv (whole run, also before the resume point) equal,
    # exactly (tolerance 0), hence the same stop step and decision.
    want, got = read_rows(straight / "losses.csv"), read_rows(resumed / "losses.csv")
    assert got == want
    assert len(got) > interrupted_at + 2  # the run went on after the resume point
    a = json.loads((straight / "result.json").read_text())
    b = json.loads((resumed / "result.json").read_text())
    assert b["earlyStop"] == a["earlyStop"]
    assert b["earlyStop"]["reason"] == "ConvergenceThreshold" and b["earlyStop"]["step"] == len(want)
    assert b["artifact"]["files"] == a["artifact"]["files"]
    for name in b["artifact"]["files"]:  # the trained weights are bit-identical too
        assert artifact_content(resumed / name) == artifact_content(straight / name), name
    assert not (resumed / "checkpoints").exists()  # removed once result.json is written


def check_refusals(config: Path, output: Path, checkpoint: Path, tmp_path: Path, capsys) -> None:
    """A changed spec and a corrupt checkpoint each end with one clear `error:` line, exit 2."""
    manifest = yaml.safe_load(config.read_text())
    manifest["spec"]["training"]["learningRate"] = 0.05
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(manifest))
    assert main(["--config", str(changed), "--output", str(output)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: checkpoint ") and "different spec (fields that differ: training.learningRate)" in err

    corrupt = tmp_path / "corrupt"
    shutil.copytree(output, corrupt)
    optimizer = corrupt / "checkpoints" / checkpoint.name / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-10] + b"0123456789")  # bit rot, same size
    assert main(["--config", str(config), "--output", str(corrupt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"error: checkpoint file {optimizer} fails its sha256 checksum (corrupt)"


@pytest.mark.parametrize("name", ["dvar", "trend"])
def test_window_sums_survive_a_restore_bit_for_bit(name):
    """A recompute from the window on load drifts ~1e-15, which could move a stop step sitting at
    the threshold; the stored running sums make the restored criterion identical."""
    rng = np.random.default_rng(3)
    xs = 1.0 + np.cumsum(rng.normal(0, 0.01, 300))
    straight, resumed = make_criterion(name, 16, 0.1), make_criterion(name, 16, 0.1)
    for t, x in enumerate(xs):
        if t in (37, 150):  # between and right after exact recomputes
            state = json.loads(json.dumps(resumed.state_dict()))
            resumed = make_criterion(name, 16, 0.1)
            resumed.load_state_dict(state)
        a, b = straight.update(x), resumed.update(x)
        assert a == b or (a is None and b is None), f"t={t}: {a!r} != {b!r}"


# ---- termination message (operator contract) ----------------------------------------------


def big_report(n_files: int) -> TrainerReport:
    return TrainerReport.model_validate({
        "progress": {"step": 40, "maxSteps": 400, "percent": 10.0},
        "earlyStop": {"stopped": True, "reason": "ConvergenceThreshold", "criterion": "dvar", "value": 0.01,
                      "threshold": 0.05, "window": 50, "step": 40, "stepsSaved": 360, "fractionSaved": 0.9},
        "identifier": "sks",
        "artifact": {"location": "/output", "files": [f"pipeline/unet/part-{i:05d}.safetensors" for i in range(n_files)]},
        "stages": [{"name": "textualInversion", "stopStep": 40, "note": "x" * 1500}],
        "message": "m" * 1000,
    })


@pytest.mark.parametrize("n_files", [0, 20, 200])
def test_termination_message_fits_and_round_trips_through_the_operator(n_files, tmp_path, monkeypatch):
    from pj_operator.lifecycle import termination_report

    report = big_report(n_files)
    log = tmp_path / "termination-log"
    monkeypatch.setenv("PJ_TERMINATION_LOG", str(log))
    assert write_termination_message(report) == log
    text = log.read_bytes()
    assert len(text) <= MAX_BYTES and b"\n" not in text  # compact
    pod = {"metadata": {"name": "p", "creationTimestamp": "2026-01-01T00:00:00Z"},
           "status": {"phase": "Succeeded", "containerStatuses": [
               {"name": "trainer", "state": {"terminated": {"exitCode": 0, "message": text.decode()}}}]}}
    recovered = termination_report([pod])
    assert recovered is not None, "the operator did not accept the message"
    assert recovered["earlyStop"] == report.to_api()["earlyStop"]  # the decision always survives
    assert recovered["identifier"] == "sks" and recovered["progress"]["step"] == 40
    assert recovered["artifact"]["location"] == "/output"


def test_termination_message_is_skipped_where_there_is_no_termination_log(tmp_path, monkeypatch):
    monkeypatch.delenv("PJ_TERMINATION_LOG", raising=False)
    import personalize.termination as termination

    monkeypatch.setattr(termination, "DEFAULT_PATH", tmp_path / "absent" / "termination-log")
    assert write_termination_message(big_report(1)) is None  # a laptop: nothing written, no error
    monkeypatch.setenv("PJ_TERMINATION_LOG", str(tmp_path / "no-such-dir" / "log"))
    assert write_termination_message(big_report(1)) is None  # unwritable: logged, never raised
    assert len(compact_report(big_report(5000))) <= MAX_BYTES
