"""Operator metrics (names per the team contract), the liveness endpoint, the console entry point."""

from __future__ import annotations

import shutil
import socket
import subprocess
import urllib.request

import pytest

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pj_operator import main as main_module
from pj_operator import metrics


def sample(name, labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_metric_names_and_early_stopping_savings():
    def counters():
        return (sample("personalization_job_completions_total", {"reason": "ConvergenceThreshold"}),
                sample("personalization_steps_saved_total", {"method": "lora"}),
                sample("personalization_gpu_seconds_saved_total", {"method": "lora"}),
                sample("personalization_tracking_gpu_seconds_total", {"method": "lora"}))

    before = counters()
    status = {"progress": {"step": 100}, "wallSeconds": 50.0,
              "earlyStop": {"stopped": True, "reason": "ConvergenceThreshold", "step": 100, "stepsSaved": 300},
              "stages": [{"name": "lora", "stopStep": 100, "seconds": 40.0, "trackingSeconds": 10.0}]}
    metrics.record_completion("Succeeded", "ConvergenceThreshold", "lora", status, gpus=2)
    after = counters()
    # 300 steps saved at 0.4 s/step (the stage's 40 s, not the run's 50 s of wall time with loading
    # and samples) on 2 GPUs = 240 GPU-seconds; tracking cost 10 s on 2 GPUs.
    assert [a - b for a, b in zip(after, before)] == [1, 300, 240, 20]
    # Without stage times in the status, the run's wall time prices the step.
    metrics.record_completion("Succeeded", "ConvergenceThreshold", "lora", {**status, "stages": []}, gpus=2)
    assert sample("personalization_gpu_seconds_saved_total", {"method": "lora"}) == after[2] + 300
    after = counters()
    # A run to maxSteps saved nothing, and still paid for its tracking (two stages here).
    metrics.record_completion("Succeeded", "MaxSteps", "lora", {
        "earlyStop": {"stopped": False, "stepsSaved": 0},
        "stages": [{"name": "a", "trackingSeconds": 1.5}, {"name": "b", "trackingSeconds": 2.5}]}, 2)
    assert sample("personalization_steps_saved_total", {"method": "lora"}) == after[1]
    assert sample("personalization_tracking_gpu_seconds_total", {"method": "lora"}) == after[3] + 8
    # A failed job is counted as a completion only.
    metrics.record_completion("Failed", "OOMKilled", "lora", {"stages": [{"trackingSeconds": 5.0}]}, 2)
    assert sample("personalization_tracking_gpu_seconds_total", {"method": "lora"}) == after[3] + 8

    metrics.PHASES.observe("uid-1", "Running")
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(REGISTRY).decode())}
    assert {"personalization_jobs", "personalization_job_completions", "personalization_steps_saved",
            "personalization_gpu_seconds_saved", "personalization_tracking_gpu_seconds"} <= set(families)
    phases = {s.labels["phase"] for s in families["personalization_jobs"].samples}
    assert phases >= {"Pending", "Queued", "Running", "Succeeded", "Failed"}
    metrics.PHASES.forget("uid-1")


def test_reconcile_errors_are_counted_and_reraised():
    @metrics.counting_errors("unit")
    def broken(**_):
        raise RuntimeError("boom")

    before = sample("personalization_reconcile_errors_total", {"handler": "unit"})
    with pytest.raises(RuntimeError, match="boom"):
        broken()
    assert sample("personalization_reconcile_errors_total", {"handler": "unit"}) == before + 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_liveness_endpoint_answers_while_running(cluster, run_operator):
    port = free_port()
    with run_operator(extra_args=("--liveness", f"http://127.0.0.1:{port}/healthz")):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
            assert response.status == 200


def test_main_wires_settings_into_kopf(monkeypatch):
    calls = {}
    monkeypatch.setenv("PJ_NAMESPACES", "team-a,team-b")
    monkeypatch.setenv("PJ_HEALTH_PORT", "9999")
    monkeypatch.setenv("PJ_METRICS_PORT", "0")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")  # in a pod: kopf logs in
    monkeypatch.setattr(main_module.kopf, "run", lambda **kwargs: calls.update(kwargs))
    assert main_module.main([]) == 0
    assert calls["standalone"] is True and calls["clusterwide"] is False
    assert calls["namespaces"] == ["team-a", "team-b"]
    assert calls["liveness_endpoint"] == "http://0.0.0.0:9999/healthz"


def test_exposition_passes_promtool_lint():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed")
    text = generate_latest(REGISTRY)
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    problems = [line for line in (result.stdout + result.stderr).decode().splitlines()
                if line.startswith("personalization_")]
    assert problems == [], problems


def test_every_known_label_value_exists_at_zero_from_start_up():
    """A fresh operator process exposes every series at 0, so the first completion (failure, error)
    is an increase that increase()/rate() and the alert rules see."""
    import json
    import sys

    code = ("import json; from prometheus_client import REGISTRY, generate_latest; "
            "from prometheus_client.parser import text_string_to_metric_families; import pj_operator.metrics; "
            "print(json.dumps([[s.name, s.labels, s.value] for f in "
            "text_string_to_metric_families(generate_latest(REGISTRY).decode()) for s in f.samples "
            "if s.name.startswith('personalization_')]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    samples = {(name, tuple(sorted(labels.items()))): value for name, labels, value in json.loads(out.stdout)}

    from personalize.spec import Method, Phase
    from pj_operator import lifecycle

    expected = (
        [("personalization_jobs", ("phase", p.value)) for p in Phase]
        + [("personalization_job_completions_total", ("reason", r))
           for r in lifecycle.SUCCESS_REASONS + lifecycle.FAILURE_REASONS]
        + [(f"personalization_{m}_total", ("method", method.value)) for m in ("steps_saved", "gpu_seconds_saved", "tracking_gpu_seconds")
           for method in Method]
        + [("personalization_reconcile_errors_total", ("handler", h)) for h in metrics.HANDLERS]
    )
    for name, label in expected:
        assert samples.get((name, (label,))) == 0.0, (name, label)
    # The specific failure reasons are label values of their own (alerts group by reason).
    assert {"OOMKilled", "ImagePullBackOff", "DeadlineExceeded", "BackoffLimitExceeded", "JobLost",
            "InvalidSpec", "BadInput"} <= set(lifecycle.FAILURE_REASONS)


def test_handlers_counted_are_the_pre_created_ones():
    """Every `counting_errors(...)` name used by the operator is in metrics.HANDLERS."""
    import inspect
    import re

    from pj_operator import handlers, pump

    used = set(re.findall(r'counting_errors\("([a-z_]+)"\)', inspect.getsource(handlers)))
    used |= set(re.findall(r'labels\(handler="([a-z_]+)"\)', inspect.getsource(pump)))
    assert used and used <= set(metrics.HANDLERS)
