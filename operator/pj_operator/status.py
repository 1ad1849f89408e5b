"""Writing the operator's part of a PersonalizationJob's status: compute from the latest copy,
merge-patch with that copy's resourceVersion as a precondition.

Several handlers may write one resource's status (its own create/update handlers, the Job watch,
the queue pump), one at a time under a per-resource lock. The latest copy is the one the watch
delivered last (`remember`) or our own last patch returned, so a write usually costs one request,
no read. Should the copy be stale, the API server refuses the patch with 409 Conflict and the
write is recomputed from a fresh read. The patch goes to the status subresource and names only
operator fields; the trainer's fields are never in it.
"""

from __future__ import annotations

import copy
import threading
from typing import Any, Callable, Optional

import kopf

from personalize import spec as api

from .kube import ApiError, Kube
from .names import PJ_API_VERSION

# A status patch answered 409 Conflict is recomputed from a fresh read this many times.
CONFLICT_ATTEMPTS = 5

_locks: dict[tuple[str, str], threading.Lock] = {}
_latest: dict[tuple[str, str], dict] = {}
_locks_guard = threading.Lock()


class Stale(Exception):
    """Raised by a `compute` that needs the resource as the API server has it now (not a cached
    copy) before it can decide: `update` reads it and computes again."""


def _lock(namespace: str, name: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault((namespace, name), threading.Lock())


def forget(namespace: str, name: str) -> None:
    with _locks_guard:
        _locks.pop((namespace, name), None)
        _latest.pop((namespace, name), None)


def remember(obj: dict) -> None:
    """The resource as a watch event (or an answer of the API server) showed it."""
    meta = obj.get("metadata") or {}
    if meta.get("namespace") and meta.get("name") and meta.get("resourceVersion"):
        with _locks_guard:
            _latest[(meta["namespace"], meta["name"])] = copy.deepcopy(dict(obj))


def _cached(namespace: str, name: str) -> Optional[dict]:
    with _locks_guard:
        obj = _latest.get((namespace, name))
        return copy.deepcopy(obj) if obj is not None else None


def latest(namespace: str, name: str) -> Optional[dict]:
    """The latest copy of the resource the operator has seen (None: none yet)."""
    return _cached(namespace, name)


def newer(namespace: str, name: str, uid: Optional[str], resource_version: Optional[str]) -> Optional[dict]:
    """The latest copy of the resource if it is another version of it than `resource_version`."""
    with _locks_guard:
        obj = _latest.get((namespace, name))
        meta = (obj or {}).get("metadata") or {}
        if obj is None or meta.get("uid") != uid or meta.get("resourceVersion") == resource_version:
            return None
        return copy.deepcopy(obj)


def get_pj(kube: Kube, namespace: str, name: str) -> Optional[dict]:
    return kube.get(PJ_API_VERSION, api.KIND, namespace, name)


def update(kube: Kube, namespace: str, name: str,
           compute: Callable[[dict], Optional[dict[str, Any]]]) -> tuple[Optional[dict], Optional[dict]]:
    """Apply `compute(latest_object) -> status patch | None`. Returns (object before, patch).

    On 409 Conflict the object changed under us: read it again and recompute (the decision may
    differ now, e.g. another handler already wrote the transition)."""
    with _lock(namespace, name):
        obj = _cached(namespace, name)
        for attempt in range(CONFLICT_ATTEMPTS):
            fresh = obj is None
            if fresh:
                obj = get_pj(kube, namespace, name)
            if obj is None or obj.get("metadata", {}).get("deletionTimestamp"):
                return obj, None
            try:
                patch = compute(obj)
            except Stale:
                obj = None
                continue
            if not patch:
                return obj, patch
            body: dict[str, Any] = {"status": api.finite_or_null(patch)}
            if not fresh:
                body["metadata"] = {"resourceVersion": obj["metadata"]["resourceVersion"]}
            try:
                answer = kube.patch(PJ_API_VERSION, api.KIND, namespace, name, body, subresource="status")
            except ApiError as err:
                if err.status != 409 or attempt == CONFLICT_ATTEMPTS - 1:
                    raise
                obj = None
                continue
            if isinstance(answer, dict):
                remember(answer)
            return obj, patch
        raise AssertionError("unreachable")


def phase_changed(before: dict, patch: Optional[dict]) -> bool:
    return bool(patch) and "phase" in patch and patch["phase"] != (before.get("status") or {}).get("phase")


# Phases whose entry is an Event on the resource. Pending and Running are not: the Job and its
# pod record their own (SuccessfulCreate, Scheduled, Pulled, Started), and the conditions keep
# the transition times; two Events fewer per job is a fifth of its API requests.
EVENT_PHASES = (api.Phase.queued.value, api.Phase.succeeded.value, api.Phase.failed.value)


def transition_event(before: dict, patch: Optional[dict], reason: str, message: str) -> None:
    """One Event per transition into an EVENT_PHASES phase: `<Phase>/<Reason>`, a Warning when
    it failed."""
    if phase_changed(before, patch) and patch["phase"] in EVENT_PHASES:
        failed = patch["phase"] == api.Phase.failed.value
        event(before, warning=failed, reason=f"{patch['phase']}/{reason}", message=message)


def event(obj: dict, *, warning: bool, reason: str, message: str) -> None:
    """A Kubernetes Event on the resource (kopf posts it in the background)."""
    kopf.event(obj, type="Warning" if warning else "Normal", reason=reason, message=message[:1024])
