"""Writing the operator's part of a PersonalizationJob's status: read fresh, compute, merge-patch.

Several handlers may write one resource's status (its own create/update handlers, the Job watch,
the queue pump). Each write re-reads the resource under a per-resource lock, so a condition list
is never computed from a stale copy by two writers at once. The patch goes to the status
subresource and names only operator fields; the trainer's fields are never in it.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional

import kopf

from personalize import spec as api

from .kube import ApiError, Kube
from .names import PJ_API_VERSION

# A status patch answered 409 Conflict is recomputed from a fresh read this many times.
CONFLICT_ATTEMPTS = 5

_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock(namespace: str, name: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault((namespace, name), threading.Lock())


def forget(namespace: str, name: str) -> None:
    with _locks_guard:
        _locks.pop((namespace, name), None)


def get_pj(kube: Kube, namespace: str, name: str) -> Optional[dict]:
    return kube.get(PJ_API_VERSION, api.KIND, namespace, name)


def update(kube: Kube, namespace: str, name: str,
           compute: Callable[[dict], Optional[dict[str, Any]]]) -> tuple[Optional[dict], Optional[dict]]:
    """Apply `compute(fresh_object) -> status patch | None`. Returns (object before, patch).

    On 409 Conflict the object changed under us: read it again and recompute (the decision may
    differ now, e.g. another handler already wrote the transition)."""
    with _lock(namespace, name):
        for attempt in range(CONFLICT_ATTEMPTS):
            obj = get_pj(kube, namespace, name)
            if obj is None or obj.get("metadata", {}).get("deletionTimestamp"):
                return obj, None
            patch = compute(obj)
            if not patch:
                return obj, patch
            try:
                kube.patch(PJ_API_VERSION, api.KIND, namespace, name, {"status": api.finite_or_null(patch)},
                           subresource="status")
            except ApiError as err:
                if err.status != 409 or attempt == CONFLICT_ATTEMPTS - 1:
                    raise
                continue
            return obj, patch
        raise AssertionError("unreachable")


def event(obj: dict, *, warning: bool, reason: str, message: str) -> None:
    """A Kubernetes Event on the resource (kopf posts it in the background)."""
    kopf.event(obj, type="Warning" if warning else "Normal", reason=reason, message=message[:1024])
