"""TrainerMetrics exposes the contract's names and labels, serves them, and pushes them."""

from __future__ import annotations

import math
import shutil
import subprocess
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from personalize.metrics import TrainerMetrics

LABELS = {"namespace": "team-a", "personalizationjob": "dog-ti", "method": "textualInversion", "criterion": "dvar"}
GAUGES = [
    "personalization_deterministic_loss",
    "personalization_training_loss",
    "personalization_convergence_value",
    "personalization_convergence_threshold",
    "personalization_step",
    "personalization_max_steps",
    "personalization_early_stopped",
]


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample_value(fams: dict, name: str, sample_name: str | None = None, **extra: str) -> float:
    [sample] = [
        s for s in fams[name].samples if s.name == (sample_name or name) and s.labels == {**LABELS, **extra}
    ]
    return sample.value


def make() -> TrainerMetrics:
    return TrainerMetrics("team-a", "dog-ti", "textualInversion", "dvar")


def test_exposition_has_contract_names_labels_and_values():
    m = make()
    before = families(m.exposition().decode())
    assert math.isnan(sample_value(before, "personalization_convergence_value"))  # unknown, not 0
    m.observe(10, 6100, train_loss=0.31, deterministic_loss=0.2, convergence_value=None, threshold=0.15,
              step_seconds=0.07, evaluation_seconds=0.02)
    m.observe(11, 6100, train_loss=0.29, deterministic_loss=None, convergence_value=0.4, threshold=0.15, step_seconds=0.3)
    m.set_early_stopped(True)
    fams = families(m.exposition().decode())
    for name in GAUGES:
        assert fams[name].type == "gauge", name
        assert {s.labels["personalizationjob"] for s in fams[name].samples} == {"dog-ti"}
    assert sample_value(fams, "personalization_step") == 11
    assert sample_value(fams, "personalization_max_steps") == 6100
    assert sample_value(fams, "personalization_training_loss") == pytest.approx(0.29)
    assert sample_value(fams, "personalization_deterministic_loss") == pytest.approx(0.2)  # kept from step 10
    assert sample_value(fams, "personalization_convergence_value") == pytest.approx(0.4)
    assert sample_value(fams, "personalization_convergence_threshold") == pytest.approx(0.15)
    assert sample_value(fams, "personalization_early_stopped") == 1
    hist = fams["personalization_step_duration_seconds"]
    assert hist.type == "histogram"
    assert sample_value(fams, hist.name, "personalization_step_duration_seconds_count") == 2
    assert sample_value(fams, hist.name, "personalization_step_duration_seconds_sum") == pytest.approx(0.37)
    assert sample_value(fams, hist.name, "personalization_step_duration_seconds_bucket", le="0.1") == 1
    # only the step that evaluated the stop signal is counted in the tracking-cost histogram
    evaluation = fams["personalization_evaluation_duration_seconds"]
    assert evaluation.type == "histogram"
    assert sample_value(fams, evaluation.name, "personalization_evaluation_duration_seconds_count") == 1
    assert sample_value(fams, evaluation.name, "personalization_evaluation_duration_seconds_sum") == pytest.approx(0.02)
    # No counters, so nothing may end in _total; and nothing leaked into the global registry.
    assert not any(name.endswith("_total") for name in fams)
    global_names = families(generate_latest(REGISTRY).decode())
    # (the operator's metrics live in the global registry, so compare against the trainer's names)
    assert not (set(fams) & set(global_names))


def test_two_runs_in_one_process_do_not_collide():
    a, b = make(), TrainerMetrics("team-b", "cat", "lora", "ema")
    a.observe(1, 10, 0.5, 0.5, None, 0.1, 0.1)
    b.observe(7, 10, 0.5, 0.5, None, 0.1, 0.1)
    assert sample_value(families(a.exposition().decode()), "personalization_step") == 1


def test_local_run_uses_empty_label_values():
    m = TrainerMetrics(None, None, "lora", "none")
    [sample] = families(m.exposition().decode())["personalization_step"].samples
    assert sample.labels == {"namespace": "", "personalizationjob": "", "method": "lora", "criterion": "none"}


def test_serve_exposes_metrics_over_http():
    m = make()
    port = m.serve(0, addr="127.0.0.1")
    try:
        m.observe(3, 100, 0.3, 0.2, 0.5, 0.15, 0.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert sample_value(families(text), "personalization_step") == 3
    finally:
        m.close()


def test_push_to_gateway_groups_by_job():
    received: list[tuple[str, str, bytes]] = []

    class Gateway(BaseHTTPRequestHandler):
        def do_PUT(self):  # noqa: N802 (http.server naming)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.command, self.path, body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Gateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        m = make()
        m.observe(5, 100, 0.3, 0.2, 0.1, 0.15, 0.1)
        assert m.push(f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()
    [(method, path, body)] = received
    assert method == "PUT"
    assert path == "/metrics/job/personalization-trainer/namespace/team-a/personalizationjob/dog-ti"
    assert sample_value(families(body.decode()), "personalization_step") == 5


def test_push_failure_is_reported_not_raised():
    assert make().push("http://127.0.0.1:9", timeout=2) is False


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_lint_is_clean():
    m = make()
    m.observe(1, 10, 0.5, 0.4, 0.3, 0.15, 0.1)
    result = subprocess.run(["promtool", "check", "metrics"], input=m.exposition(), capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_per_timestep_loss_statistics_and_sample_cost_are_exposed():
    m = make()
    before = families(m.exposition().decode())
    assert math.isnan(sample_value(before, "personalization_gradient_norm"))  # unknown until the first step
    stats = {"lr": 1e-4, "grad_norm": 0.8, "update_ratio": 2e-3, "update_cosine": math.nan, "adam_snr": 0.3}
    m.observe(1, 100, 0.3, 0.2, None, 0.15, 0.1, timestep_losses={"t=0017": 0.4, "t=0911": 0.05}, stats=stats)
    m.observe(2, 100, 0.3, None, None, 0.15, 0.1, stats={**stats, "update_cosine": -0.2})  # no evaluation here
    m.observe(3, 100, 0.3, 0.19, None, 0.15, 0.1, timestep_losses={"t=0017": 0.3, "t=0911": 0.05})
    m.observe_samples(2.5)
    fams = families(m.exposition().decode())
    assert sample_value(fams, "personalization_timestep_deterministic_loss", timestep="t=0017") == pytest.approx(0.3)
    ratio = "personalization_timestep_deterministic_loss_ratio"
    assert sample_value(fams, ratio, timestep="t=0017") == pytest.approx(0.75)  # relative to its first value
    assert sample_value(fams, ratio, timestep="t=0911") == pytest.approx(1.0)
    assert sample_value(fams, "personalization_timestep_deterministic_loss", timestep="t=0911") == pytest.approx(0.05)
    assert sample_value(fams, "personalization_learning_rate") == pytest.approx(1e-4)
    assert sample_value(fams, "personalization_gradient_norm") == pytest.approx(0.8)
    assert sample_value(fams, "personalization_update_ratio") == pytest.approx(2e-3)
    assert sample_value(fams, "personalization_update_cosine") == pytest.approx(-0.2)
    assert sample_value(fams, "personalization_adam_snr") == pytest.approx(0.3)
    samples = "personalization_sample_duration_seconds"
    assert sample_value(fams, samples, f"{samples}_count") == 1 and sample_value(fams, samples, f"{samples}_sum") == 2.5
