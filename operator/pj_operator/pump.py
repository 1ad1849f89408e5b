"""The queue pump: every PJ_POLL_INTERVAL seconds, one listing decides what moves.

- Admit waiting jobs while the concurrency cap has room (highest priority, then oldest first)
  and refresh every waiting job's queue position.
- Look at the pods of admitted jobs that have not started: a pod stuck pulling its image never
  fails its Job by itself, so the operator fails the resource (reason ImagePullBackOff).

It runs in a thread started by the first resource event and stopped by kopf's cleanup handler. It keeps
no state between ticks: each tick recomputes everything from what the API server lists.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from typing import Optional

from personalize import spec as api

from . import capacity, lifecycle, metrics, names, reconcile
from .kube import Kube
from .settings import Settings
from .validation import validate_job

logger = logging.getLogger(__name__)


def tick(kube: Kube, settings: Settings) -> None:
    pjs = reconcile.list_pjs(kube, settings)
    if settings.max_concurrent_jobs > 0:
        admit_waiting(kube, settings, pjs)
    check_starting_pods(kube, pjs)


def admit_waiting(kube: Kube, settings: Settings, pjs: list[dict]) -> None:
    waiting = [pj for pj in pjs if capacity.is_waiting(pj)]
    if not waiting:
        return
    values, default = reconcile.priorities(kube)
    waiting.sort(key=lambda pj: capacity.queue_key(pj, values, default))
    running = sum(1 for pj in pjs if capacity.holds_slot(pj))
    free = max(settings.max_concurrent_jobs - running, 0)
    queued = [pj for pj in waiting[free:] if (pj.get("status") or {}).get("phase")]
    for pj in waiting[:free]:
        if not (pj.get("status") or {}).get("phase"):
            # Brand new: its own create handler is deciding right now. It keeps its place (so we
            # do not give its slot away) but we leave the admission to that handler.
            continue
        checked = validate_job(pj, settings)
        if checked.ok:
            reconcile.admit(kube, pj, checked.job, settings)
        else:
            reconcile.mark_invalid(kube, pj, checked.problems)
    for index, pj in enumerate(queued):
        decision = capacity.Decision(admit=False, position=index + 1, waiting=len(queued),
                                     running=min(running + free, settings.max_concurrent_jobs),
                                     cap=settings.max_concurrent_jobs)
        cond = lifecycle.get_condition(pj.get("status") or {}, lifecycle.QUEUED) or {}
        if cond.get("message") != decision.message:
            reconcile.mark_queued(kube, pj, "WaitingForCapacity", decision.message)


def check_starting_pods(kube: Kube, pjs: list[dict]) -> None:
    starting = [pj for pj in pjs if (pj.get("status") or {}).get("phase") == api.Phase.pending.value
                and (pj.get("status") or {}).get("jobName")]
    # One listing of trainer pods per namespace, however many jobs are starting there.
    pods_by_job: dict[tuple[str, str], list[dict]] = {}
    for namespace in sorted({pj["metadata"]["namespace"] for pj in starting}):
        for pod in kube.list("v1", "Pod", namespace, {names.LABEL_APP: names.TRAINER_APP}):
            key = (namespace, pod["metadata"].get("labels", {}).get(names.LABEL_JOB, ""))
            pods_by_job.setdefault(key, []).append(pod)
    for pj in starting:
        namespace, name = pj["metadata"]["namespace"], pj["metadata"]["name"]
        pods = pods_by_job.get((namespace, name), [])
        if lifecycle.image_pull_failure(pods):
            job = kube.get("batch/v1", "Job", namespace, pj["status"]["jobName"])
            reconcile.sync_lifecycle(kube, namespace, name, job, pods, owner_uid=pj["metadata"].get("uid"))


class Pump:
    def __init__(self, kube: Kube, settings: Settings):
        self.kube = kube
        self.settings = settings
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._start_lock = threading.Lock()

    def ensure_started(self) -> None:
        """Start once, from a resource handler: kopf.event needs the context variables of kopf's
        event poster, which exist in resource handlers but not yet in startup handlers."""
        with self._start_lock:
            if self._thread is not None or self._stop.is_set():
                return
            context = contextvars.copy_context()
            self._thread = threading.Thread(target=context.run, args=(self._run,), name="pj-queue-pump",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._start_lock:
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.poll_interval):
            try:
                tick(self.kube, self.settings)
            except Exception:  # keep pumping: the next tick recomputes everything anyway
                metrics.RECONCILE_ERRORS.labels(handler="queue_pump").inc()
                logger.exception("queue pump tick failed")
