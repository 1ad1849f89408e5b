"""The queue pump: every PJ_POLL_INTERVAL seconds, one look at the cluster decides what moves.

- Admit waiting jobs while the concurrency cap has room (highest priority, then oldest first)
  and refresh every waiting job's queue position.
- Resync every admitted, unfinished job from its Job's actual state. The Job watch delivers
  the same transitions sooner, but an event whose handling failed (the API server was down
  while kopf ran the handler) is never delivered again; the resync catches up within a tick.
- Fail jobs whose pod cannot start (lifecycle.start_failure): a pod stuck pulling its image, on
  a missing Secret, refused by a quota or webhook, or on a volume attached elsewhere never fails
  its Job by itself and would hold its slot and its node's GPU.

The look is the watches' indexes (watched.py): a tick sends no request unless something must
change. A full listing of every kind replaces them for one tick at the start, after a
PersonalizationJob or Job watch had to list again (its stream expired), and every
PJ_RESYNC_INTERVAL seconds: the safety net for an event no watch delivered.

It runs in a thread started by the first resource event and stopped by kopf's cleanup handler.
What it keeps between ticks is when to list next and which indexed objects that listing found
gone; every decision is recomputed from the look of its tick.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from typing import Optional

from personalize import spec as api

from . import capacity, lifecycle, metrics, pack_reconcile, reconcile, watched
from .kube import Kube
from .settings import Settings
from .validation import validate_job

logger = logging.getLogger(__name__)


def tick(kube: Kube, settings: Settings, view: watched.View) -> None:
    if settings.max_concurrent_jobs > 0:
        admit_waiting(kube, settings, view.pjs)
    resync(kube, settings, view)


def admit_waiting(kube: Kube, settings: Settings, pjs: list[dict]) -> None:
    waiting = [pj for pj in pjs if capacity.is_waiting(pj)]
    if not waiting:
        return
    values, default = reconcile.priorities(kube, waiting)
    waiting.sort(key=lambda pj: capacity.queue_key(pj, values, default))
    free = max(settings.max_concurrent_jobs - capacity.slots_held(pjs), 0)
    queued = []
    for pj in waiting:
        if not (pj.get("status") or {}).get("phase"):
            # Brand new: its own create handler is deciding right now. It keeps its place (so we
            # do not give its slot away) but we leave the admission to that handler.
            free = max(free - 1, 0)
            continue
        checked = validate_job(pj, settings)
        if checked.ok and _joins_open_pack(kube, pj, checked.job, settings):
            continue  # a slot in a pack that runs already: none of the cap's
        if not free:
            queued.append(pj)
        elif checked.ok:
            free -= 1
            reconcile.admit_any(kube, pj, checked.job, settings)
        else:
            free -= 1
            reconcile.mark_invalid(kube, pj, checked.problems)
    for index, pj in enumerate(queued):
        decision = capacity.Decision(admit=False, position=index + 1, waiting=len(queued),
                                     running=settings.max_concurrent_jobs - free,
                                     cap=settings.max_concurrent_jobs)
        cond = lifecycle.get_condition(pj.get("status") or {}, lifecycle.QUEUED) or {}
        if cond.get("message") != decision.message:
            reconcile.mark_queued(kube, pj, "WaitingForCapacity", decision.message)


def _joins_open_pack(kube: Kube, pj: dict, parsed: api.PersonalizationJob, settings: Settings) -> bool:
    if pack_reconcile.unpackable(parsed, pj["metadata"]["name"], settings) is not None:
        return False
    return pack_reconcile.admit(kube, pj, parsed, settings, may_found=False)


def _admitted_unfinished(pj: dict) -> bool:
    st = pj.get("status") or {}
    return bool(st.get("jobName")) and st.get("phase") not in lifecycle.TERMINAL \
        and not pj["metadata"].get("deletionTimestamp")


def resync(kube: Kube, settings: Settings, view: watched.View) -> None:
    """Every admitted, unfinished job against its Job, its pods and (while one waits) the Warning
    events of its namespace. A job's status is written only when what they show differs from it."""
    limits = lifecycle.StartLimits(image_pull_grace=settings.image_pull_grace_seconds,
                                   start_failure_grace=settings.start_failure_grace_seconds,
                                   pending_deadline=settings.pending_deadline_seconds)
    unfinished = [pj for pj in view.pjs if _admitted_unfinished(pj)]
    if not unfinished:
        return
    spaces = view.by_namespace()
    for pj in sorted(unfinished, key=lambda pj: (pj["metadata"]["namespace"], pj["metadata"]["name"])):
        jobs, pods, events = spaces.get(pj["metadata"]["namespace"], ({}, [], []))
        _resync_one(kube, pj, jobs, pods, events, limits, settings)


def _resync_one(kube: Kube, pj: dict, jobs: dict[str, dict], pods: list[dict], events: list[dict],
                limits: lifecycle.StartLimits, settings: Settings) -> None:
    namespace, name, uid = pj["metadata"]["namespace"], pj["metadata"]["name"], pj["metadata"].get("uid", "")
    st = pj.get("status") or {}
    job = jobs.get(st["jobName"])
    if job is None:
        if not (st.get("startTime") or st.get("progress")):
            return  # not created yet (admission is creating it) or never started: reconcile's business
    elif not reconcile.owned_by(job, uid):
        return  # an earlier resource's Job, waiting for the garbage collector
    job_uid = (job or {}).get("metadata", {}).get("uid")
    own_pods = [p for p in pods if any(ref.get("uid") == job_uid for ref in p["metadata"].get("ownerReferences", []))]
    if pack_reconcile.is_packed(pj):
        _resync_member(kube, pj, job, own_pods, events, limits, settings)
        return
    if lifecycle.lifecycle_patch(st, lifecycle.observe_job(job, own_pods, st, events, limits)) is None:
        return
    reconcile.sync_lifecycle(kube, namespace, name, job, own_pods, owner_uid=uid, events=events, limits=limits)


def _resync_member(kube: Kube, pj: dict, job: Optional[dict], pods: list[dict], events: list[dict],
                   limits: lifecycle.StartLimits, settings: Settings) -> None:
    """A pack's member: the same look, its pack's rules (pack_lifecycle); a member released by a
    pack that ended without it is admitted again."""
    namespace, name = pj["metadata"]["namespace"], pj["metadata"]["name"]
    pack = pj["status"]["pack"]["job"]
    view = pack_reconcile.BOOK.pack(namespace, pack)
    if job is None and (view is None or not view.job_created):
        return  # collecting members: its Job is not due yet
    released = pack_reconcile.sync_member(kube, namespace, name, pack, job, pods, settings, events, limits)
    if released is not None:
        reconcile.reconcile(kube, released, settings)


class Pump:
    def __init__(self, kube: Kube, settings: Settings):
        self.kube = kube
        self.settings = settings
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._start_lock = threading.Lock()
        self._indexes: Optional[watched.Indexes] = None
        self._next_listing = 0.0  # time.monotonic() of the next full listing: at once

    def ensure_started(self, indexes: Optional[watched.Indexes] = None) -> None:
        """Start once, from a resource handler: kopf.event needs the context variables of kopf's
        event poster, which exist in resource handlers but not yet in startup handlers. The
        handler hands over kopf's indexes (the same objects for the operator's whole run)."""
        with self._start_lock:
            if self._indexes is None and indexes is not None:
                self._indexes = indexes
            if self._thread is not None or self._stop.is_set():
                return
            context = contextvars.copy_context()
            self._thread = threading.Thread(target=context.run, args=(self._run,), name="pj-queue-pump",
                                            daemon=True)
            self._thread.start()

    def list_again(self) -> None:
        """A watch listed its kind again (its stream expired): the indexes may hold objects
        deleted in the gap, so the next tick lists everything."""
        self._next_listing = 0.0

    def stop(self) -> None:
        with self._start_lock:
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def look(self) -> watched.View:
        """The indexes, or a full listing when one is due (or no index was handed over)."""
        indexes = self._indexes
        if indexes is not None and time.monotonic() < self._next_listing:
            return indexes.view()
        before = indexes.uids() if indexes is not None else set()
        view = watched.listed(self.kube, self.settings)
        if indexes is not None:
            indexes.forget_missing(view, before)
        self._next_listing = time.monotonic() + self.settings.resync_interval
        return view

    def _run(self) -> None:
        while not self._stop.wait(self.settings.poll_interval):
            try:
                tick(self.kube, self.settings, self.look())
            except Exception:  # keep pumping: the next tick recomputes everything anyway
                metrics.RECONCILE_ERRORS.labels(handler="queue_pump").inc()
                logger.exception("queue pump tick failed")
