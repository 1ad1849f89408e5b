"""The fleet dashboard's job table from the resources the watch reports."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pj_operator.job_table import JobTable

FINISHED = {
    "metadata": {"uid": "u1", "namespace": "team-a", "name": "cat", "creationTimestamp": "2025-01-01T10:00:00Z"},
    "spec": {"method": "lora", "resources": {"gpus": 2}},
    "status": {"phase": "Succeeded", "identifier": "sks", "startTime": "2025-01-01T10:01:30Z",
               "progress": {"step": 100, "maxSteps": 400},
               "earlyStop": {"stopped": True, "reason": "ConvergenceThreshold", "step": 100, "stepsSaved": 300},
               "stages": [{"seconds": 50.0, "trackingSeconds": 5.0}]},
}
RUNNING = {
    "metadata": {"uid": "u2", "namespace": "team-b", "name": "dog", "creationTimestamp": "2025-01-01T10:00:00Z"},
    "spec": {"method": "textualInversion"},
    "status": {"phase": "Running", "identifier": "<dog>", "startTime": "2025-01-01T10:00:05Z",
               "progress": {"step": 40, "maxSteps": 6100, "elapsedSeconds": 20.0}},
}


def samples(table: JobTable) -> dict:
    registry = CollectorRegistry()
    registry.register(table)
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, s.labels["personalizationjob"])] = (s.value, s.labels)
    return out


def test_each_job_has_its_info_step_gpu_time_savings_and_queue_wait():
    table = JobTable()
    table.observe(FINISHED)
    table.observe(RUNNING)
    got = samples(table)
    value, labels = got[("personalization_job_info", "cat")]
    assert value == 1 and labels == {"namespace": "team-a", "personalizationjob": "cat", "method": "lora",
                                     "phase": "Succeeded", "token": "sks", "reason": "ConvergenceThreshold"}
    assert got[("personalization_job_step", "cat")][0] == 100
    assert got[("personalization_job_gpu_seconds", "cat")][0] == 100.0  # 50 s x 2 GPUs
    assert got[("personalization_job_gpu_seconds_saved", "cat")][0] == 300 * 50.0 / 100 * 2
    assert got[("personalization_job_tracking_gpu_seconds", "cat")][0] == 10.0
    assert got[("personalization_job_queue_wait_seconds", "cat")][0] == 90.0
    assert got[("personalization_job_info", "dog")][1]["reason"] == ""  # still running
    assert got[("personalization_job_gpu_seconds", "dog")][0] == 20.0  # its elapsed time so far
    assert got[("personalization_job_gpu_seconds_saved", "dog")][0] == 0.0
    table.forget("u2")
    assert ("personalization_job_info", "dog") not in samples(table)
