"""One live monitoring session, shared by tests/ship/test_prometheus_integration.py and
benchmarks/ship.py: a real Prometheus scraping a real tiny `personalize-train` run, the operator's
metrics module and two scripted trainers (see metrics_drivers.py), with the chart's alert rules
loaded.

Timing is observed from outside: the trainer's /metrics is polled every 50 ms to see when its
first step completed, and Prometheus is polled for the first stored sample of that step.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from prom_harness import Prometheus, free_port, http_get
from ship_helpers import rendered_rule_groups

HERE = Path(__file__).resolve().parent
JOB_NAMESPACE = "ship-test"
JOB_NAME = "live-ti"
TRAINER_POD = "live-ti-trainer-x7k2p"
# Short windows so that the live data trips every alert within seconds.
LIVE_RULE_VALUES = {"monitoring": {"prometheusRule": {"stuckFor": "3s", "window": "5m"}}}

# A random-weight tiny pipeline and concept images, built in a child process (torch stays out of
# the test process).
_SETUP = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from personalize.world.tiny_models import build_tiny_pipeline_folder
    from personalize.world.shapes import HELD_OUT_CONCEPTS, write_concept_images
    out = Path(sys.argv[1])
    build_tiny_pipeline_folder(out / "pipeline")
    write_concept_images(HELD_OUT_CONCEPTS[0], 8, out / "images")
    """
)


def job_manifest(workdir: Path) -> dict:
    # DVAR over 30 evaluations with a loose threshold: it would stop near step 31, which a fast
    # CPU trains in 1.5 s, between two 1-s scrapes or three (the Early stop annotation then sees
    # no 0 before the 1). minSteps 120 keeps it training for several scrapes on any machine
    # (about 5 s at 0.045 s per step, 35 s at 0.3) before it stops early.
    return {
        "apiVersion": "personalization.dvar.dev/v1alpha1",
        "kind": "PersonalizationJob",
        "metadata": {"name": JOB_NAME, "namespace": JOB_NAMESPACE},
        "spec": {
            "method": "textualInversion",
            "baseModel": {"path": str(workdir / "pipeline")},
            "concept": {"images": {"path": str(workdir / "images")}, "classNoun": "triangle", "token": "<concept>"},
            "training": {"maxSteps": 300, "minSteps": 120, "batchSize": 2, "learningRate": 0.01},
            "earlyStopping": {"criterion": "dvar", "window": 30, "threshold": 0.9},
            # grids while training: the samples' cost panel has data
            "validation": {"prompts": ["a photo of {token}"], "numImagesPerPrompt": 1, "inferenceSteps": 2,
                           "everySteps": 40},
        },
    }


@dataclass
class LiveSession:
    prom: Prometheus
    workdir: Path
    rules_file: Path
    trainer_returncode: int
    trainer_log: str
    trainer_exposition: str  # the last /metrics body seen while it trained
    operator_exposition: str
    first_step_wall: Optional[float]  # when the trainer's /metrics first showed step >= 1
    first_sample_wall: Optional[float]  # when Prometheus first returned a sample with step >= 1
    first_sample_timestamp: Optional[float]  # that sample's own timestamp
    eval_time: float  # a moment the trainer was live, after it had stopped early
    trainer_wall_seconds: float
    processes: list = field(default_factory=list)

    def close(self) -> None:
        self.prom.stop()
        for proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)


def _start_driver(args: list[str], log: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(HERE / "metrics_drivers.py"), *args],
                            stdout=subprocess.PIPE, stderr=log.open("wb"), text=True)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"metrics driver {args} failed:\n{log.read_text()[-3000:]}")
    return proc


def _step_of(exposition: str) -> Optional[float]:
    for line in exposition.splitlines():
        if line.startswith("personalization_step{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def start(workdir: Path, trainer_timeout: float = 240.0) -> LiveSession:
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PJ_NAMESPACE", None)
    env.pop("PJ_NAME", None)  # no cluster: the trainer must not try to patch a status
    subprocess.run([sys.executable, "-c", _SETUP, str(workdir)], check=True, env=env, timeout=300,
                   capture_output=True)
    config = workdir / "job.yaml"
    config.write_text(yaml.safe_dump(job_manifest(workdir), sort_keys=False))

    rules_file = workdir / "alerts.rules.yaml"
    rules_file.write_text(yaml.safe_dump(rendered_rule_groups(LIVE_RULE_VALUES), sort_keys=False))

    processes: list[subprocess.Popen] = []
    prom: Optional[Prometheus] = None
    try:
        operator_port, hung_port, budget_port, trainer_port, dcgm_port = (free_port() for _ in range(5))
        processes.append(_start_driver(["operator", str(operator_port)], workdir / "operator-driver.log"))
        processes.append(_start_driver(["trainers", str(hung_port), str(budget_port)], workdir / "trainers-driver.log"))
        processes.append(_start_driver(["dcgm", str(dcgm_port), JOB_NAMESPACE, TRAINER_POD], workdir / "dcgm-driver.log"))
        prom = Prometheus(
            workdir / "prometheus",
            targets={
                "trainer": [f"127.0.0.1:{trainer_port}"],
                "operator": [f"127.0.0.1:{operator_port}"],
                "scripted-trainers": [f"127.0.0.1:{hung_port}", f"127.0.0.1:{budget_port}"],
                "dcgm": [f"127.0.0.1:{dcgm_port}"],
            },
            labels={"trainer": {"pod": TRAINER_POD}},  # what a PodMonitor's target carries
            rule_files=[rules_file],
        )
        prom.start()

        trainer_log = workdir / "trainer.log"
        started = time.monotonic()
        with trainer_log.open("wb") as log:
            trainer = subprocess.Popen(
                # The console script of the Python running this session: the test command runs
                # `.venv/bin/python -m pytest` without the virtualenv on PATH.
                [str(Path(sys.executable).with_name("personalize-train")), "--config", str(config),
                 "--output", str(workdir / "output"),
                 "--metrics-port", str(trainer_port), "--metrics-linger", "3"],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        processes.append(trainer)

        first_step_wall = first_sample_wall = first_sample_ts = None
        exposition = ""
        while trainer.poll() is None:
            if time.monotonic() - started > trainer_timeout:
                raise TimeoutError(f"personalize-train did not finish in {trainer_timeout}s")
            try:
                body = http_get(f"http://127.0.0.1:{trainer_port}/metrics", timeout=1).decode()
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                body = ""
            step = _step_of(body)
            if step is not None and step >= 1:
                exposition = body
                if first_step_wall is None:
                    first_step_wall = time.time()
            if first_step_wall is not None and first_sample_wall is None:
                result = prom.query('personalization_step{job="trainer"} >= 1')
                if result:
                    first_sample_wall = time.time()
                    first_sample_ts = float(result[0]["value"][0])
            time.sleep(0.05)
        wall = time.monotonic() - started

        # The last moment Prometheus saw the trainer report its early stop (its series go
        # stale when the process exits, so queries are evaluated then).
        now = time.time()
        stopped = prom.api("query_range", query='personalization_early_stopped{job="trainer"} == 1',
                           start=f"{now - 600:.3f}", end=f"{now:.3f}", step="0.5")["result"]
        if stopped:
            eval_time = max(float(t) for series in stopped for t, _ in series["values"])
        else:
            live = prom.api("query_range", query='personalization_step{job="trainer"}',
                            start=f"{now - 600:.3f}", end=f"{now:.3f}", step="0.5")["result"]
            eval_time = max((float(t) for s in live for t, _ in s["values"]), default=now)
        operator_exposition = http_get(f"http://127.0.0.1:{operator_port}/metrics").decode()
        return LiveSession(
            prom=prom, workdir=workdir, rules_file=rules_file, trainer_returncode=trainer.returncode,
            trainer_log=trainer_log.read_text(errors="replace"), trainer_exposition=exposition,
            operator_exposition=operator_exposition, first_step_wall=first_step_wall,
            first_sample_wall=first_sample_wall, first_sample_timestamp=first_sample_ts,
            eval_time=eval_time, trainer_wall_seconds=wall, processes=processes,
        )
    except BaseException:
        if prom is not None:
            prom.stop()
        for proc in processes:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
        raise
