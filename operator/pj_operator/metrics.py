"""Operator metrics (names listed in docs/operator.md), served on PJ_METRICS_PORT at /metrics."""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Optional

from prometheus_client import REGISTRY, CollectorRegistry, Counter, start_http_server
from prometheus_client.core import GaugeMetricFamily

from personalize.spec import Method, Phase

from . import job_table, lifecycle

COMPLETIONS = Counter(
    "personalization_job_completions", "PersonalizationJobs that finished, by reason.", ["reason"],
)
STEPS_SAVED = Counter(
    "personalization_steps_saved", "Training steps not run because early stopping stopped the job.",
    ["method"],
)
GPU_SECONDS_SAVED = Counter(
    "personalization_gpu_seconds_saved",
    "Estimated GPU-seconds saved by early stopping (steps saved x measured seconds per step x GPUs).",
    ["method"],
)
TRACKING_GPU_SECONDS = Counter(
    "personalization_tracking_gpu_seconds",
    "GPU-seconds finished jobs spent evaluating their stop signal (the trainer's trackingSeconds x GPUs): "
    "what early stopping cost, to set against what it saved.",
    ["method"],
)
RECONCILE_ERRORS = Counter(
    "personalization_reconcile_errors", "Handler invocations that raised (kopf retries them).", ["handler"],
)


# Every known label value exists from start-up at 0, so the first increment is an increase that
# increase()/rate() see (a series born at 1 has no earlier sample to differ from).
HANDLERS = ("reconcile", "spec_change", "job_event", "queue_pump")
for _reason in lifecycle.SUCCESS_REASONS + lifecycle.FAILURE_REASONS:
    COMPLETIONS.labels(reason=_reason)
for _method in Method:
    STEPS_SAVED.labels(method=_method.value)
    GPU_SECONDS_SAVED.labels(method=_method.value)
    TRACKING_GPU_SECONDS.labels(method=_method.value)
for _handler in HANDLERS:
    RECONCILE_ERRORS.labels(handler=_handler)


class PhaseCollector:
    """`personalization_jobs{phase}` from the phases the operator last saw on each resource.

    The map is a cache of what the watch stream reports (rebuilt from kopf's initial listing
    after a restart); it decides nothing, it is only counted at scrape time.
    """

    def __init__(self) -> None:
        self._phases: dict[str, str] = {}
        self._lock = threading.Lock()

    def observe(self, uid: str, phase: Optional[str]) -> None:
        with self._lock:
            self._phases[uid] = phase or "Unknown"

    def forget(self, uid: str) -> None:
        with self._lock:
            self._phases.pop(uid, None)

    def counts(self) -> dict[str, int]:
        counts = {p.value: 0 for p in Phase}
        with self._lock:
            for phase in self._phases.values():
                counts[phase] = counts.get(phase, 0) + 1
        return counts

    def collect(self):
        family = GaugeMetricFamily("personalization_jobs", "PersonalizationJobs by phase.", labels=["phase"])
        for phase, count in sorted(self.counts().items()):
            family.add_metric([phase], count)
        yield family


PHASES = PhaseCollector()
REGISTRY.register(PHASES)


def record_completion(phase: str, reason: str, method: str, status: dict[str, Any], gpus: int) -> None:
    """Count one finished job; credit early stopping with the steps (and GPU time) it saved, and
    charge it with the GPU time its tracking cost."""
    COMPLETIONS.labels(reason=reason).inc()
    if phase != Phase.succeeded.value:
        return
    stages = status.get("stages") or []
    tracking = sum(stage.get("trackingSeconds") or 0.0 for stage in stages)
    if tracking > 0 and gpus > 0:
        TRACKING_GPU_SECONDS.labels(method=method).inc(tracking * gpus)
    early = status.get("earlyStop") or {}
    saved = early.get("stepsSaved") or 0
    if not early.get("stopped") or saved <= 0:
        return
    STEPS_SAVED.labels(method=method).inc(saved)
    # Seconds per step from the trainer's own clock over the steps it actually ran: the stages'
    # training time where reported (the run's wall time also holds model loading, samples and
    # uploads, which a longer run would not have repeated), else the wall time.
    gpu_seconds = job_table.gpu_seconds_saved(status, gpus)
    if gpu_seconds > 0:
        GPU_SECONDS_SAVED.labels(method=method).inc(gpu_seconds)


def counting_errors(handler: str) -> Callable:
    """Decorator: count exceptions of a handler, then let kopf see (and retry) them."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception:
                RECONCILE_ERRORS.labels(handler=handler).inc()
                raise

        return inner

    return wrap


def serve(port: int, registry: CollectorRegistry = REGISTRY) -> None:
    start_http_server(port, registry=registry)
