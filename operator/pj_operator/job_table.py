"""The fleet dashboard's job table: one set of series per PersonalizationJob the operator sees.

    personalization_job_info{namespace, personalizationjob, method, phase, token, reason} 1
    personalization_job_step{namespace, personalizationjob}                    where it is (or stopped)
    personalization_job_gpu_seconds{...}                                       GPU time it has used
    personalization_job_gpu_seconds_saved{...}, personalization_job_tracking_gpu_seconds{...}
    personalization_job_queue_wait_seconds{...}                                creation to start

Like `personalization_jobs{phase}`, the table is a cache of what the watch reports, counted at
scrape time; a deleted resource leaves it (the counters of metrics.py keep the fleet's totals).
The label set is bounded by the resources in the cluster, one series each.
"""

from __future__ import annotations

import datetime
import threading
from typing import Any, Optional

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily

KEY = ["namespace", "personalizationjob"]


def _seconds_between(start: Optional[str], end: Optional[str]) -> Optional[float]:
    if not start or not end:
        return None
    parse = lambda t: datetime.datetime.fromisoformat(t.replace("Z", "+00:00"))  # noqa: E731
    return max((parse(end) - parse(start)).total_seconds(), 0.0)


def trained_seconds(status: dict[str, Any]) -> float:
    """The trainer's own training time: its stages' seconds where reported, else its wall time
    (which also holds loading, samples and uploads), else the elapsed time of a running job."""
    stages = status.get("stages") or []
    return (sum(s.get("seconds") or 0.0 for s in stages) or status.get("wallSeconds")
            or (status.get("progress") or {}).get("elapsedSeconds") or 0.0)


def gpu_seconds_saved(status: dict[str, Any], gpus: float) -> float:
    """Steps early stopping saved x the measured seconds per step x GPUs (0 without an early stop)."""
    early = status.get("earlyStop") or {}
    saved = early.get("stepsSaved") or 0
    steps_run = (status.get("progress") or {}).get("step") or early.get("step") or 0
    if not early.get("stopped") or saved <= 0 or steps_run <= 0 or gpus <= 0:
        return 0.0
    return saved * trained_seconds(status) / steps_run * gpus


def row(body: dict[str, Any]) -> dict[str, Any]:
    """One job's cells, from the resource as the watch reports it."""
    meta, spec, status = body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}
    gpus = float((spec.get("resources") or {}).get("gpus", 1))
    succeeded = next((c for c in status.get("conditions") or [] if c.get("type") == "Succeeded"), {})
    stages = status.get("stages") or []
    return {
        "key": [meta.get("namespace", ""), meta.get("name", "")],
        "info": {"method": spec.get("method", ""), "phase": status.get("phase") or "Unknown",
                 "token": status.get("identifier") or "",
                 "reason": (status.get("earlyStop") or {}).get("reason") or succeeded.get("reason") or ""},
        "step": (status.get("progress") or {}).get("step"),
        "gpu_seconds": trained_seconds(status) * gpus,
        "gpu_seconds_saved": gpu_seconds_saved(status, gpus),
        "tracking_gpu_seconds": sum(s.get("trackingSeconds") or 0.0 for s in stages) * gpus,
        "queue_wait_seconds": _seconds_between(meta.get("creationTimestamp"), status.get("startTime")),
    }


SERIES = {
    "step": "Optimizer steps of the job (where it stopped, once ended).",
    "gpu_seconds": "GPU-seconds the job has trained (its training time x GPUs).",
    "gpu_seconds_saved": "GPU-seconds early stopping saved the job.",
    "tracking_gpu_seconds": "GPU-seconds the job spent evaluating its stop signal.",
    "queue_wait_seconds": "Seconds from the job's creation to its start.",
}


class JobTable:
    def __init__(self) -> None:
        self._rows: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def observe(self, body: dict[str, Any]) -> None:
        uid = (body.get("metadata") or {}).get("uid", "")
        with self._lock:
            self._rows[uid] = row(body)

    def forget(self, uid: str) -> None:
        with self._lock:
            self._rows.pop(uid, None)

    def collect(self):
        with self._lock:
            rows = list(self._rows.values())
        info = GaugeMetricFamily("personalization_job_info", "One series per PersonalizationJob: its method, "
                                 "phase, identifier token and stop reason.", labels=[*KEY, "method", "phase", "token", "reason"])
        families = {name: GaugeMetricFamily(f"personalization_job_{name}", doc, labels=KEY) for name, doc in SERIES.items()}
        for r in rows:
            info.add_metric([*r["key"], *r["info"].values()], 1)
            for name, family in families.items():
                if r[name] is not None:
                    family.add_metric(r["key"], r[name])
        yield info
        yield from families.values()


JOBS = JobTable()
REGISTRY.register(JOBS)
