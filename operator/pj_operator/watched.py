"""What the watches show: kopf indexes of the resources the queue pump decides from.

kopf keeps these up to date from one watch stream per kind, so the pump's ticks read memory, not
the API server: the PersonalizationJobs, the operator's Jobs, the trainer pods (label
app=trainer, filtered by the API server) and Warning events on pods and Jobs (type=Warning,
filtered by the API server). Each index keeps a trimmed copy: what the decisions read, not the
pod templates, managedFields or kopf's own annotations.

A watch misses nothing while it runs, and kopf lists a kind again when its stream expires
(410 Gone). What such a listing cannot show is an object deleted during the gap: kopf never
hears of it, and it would stay in its index. `listed` is the full listing the pump does at its
start, after a PersonalizationJob or Job watch listed again, and every PJ_RESYNC_INTERVAL
seconds; whatever the indexes hold that it did not find is left out of later views (`ghosts`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

import kopf

from personalize import spec as api

from . import names, status
from .kube import Kube
from .settings import OPERATOR_NAME, Settings

PJ = (api.API_GROUP, api.API_VERSION, api.PLURAL)
JOBS = ("batch", "v1", "jobs")
PODS = ("v1", "pods")
EVENTS = ("v1", "events")
EVENT_KINDS = ("Pod", "Job")  # start failures are told on the pod (kubelet) or the Job (controller)
INDEXES = ("pj_index", "job_index", "pod_index", "event_index")
_PJ_API_VERSION = f"{api.API_GROUP}/{api.API_VERSION}"


def configure(settings: kopf.OperatorSettings) -> None:
    """Let the API server filter what the pod and event watches send."""
    settings.watching.label_selectors[PODS] = f"{names.LABEL_APP}={names.TRAINER_APP}"
    settings.watching.field_selectors[EVENTS] = "type=Warning"


def _metadata(body: Mapping[str, Any], *keys: str) -> dict:
    meta = body.get("metadata") or {}
    return {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp", *keys)
            if k in meta}


def trim_pj(body: Mapping[str, Any]) -> dict:
    meta = _metadata(body, "generation", "labels", "deletionTimestamp", "ownerReferences")
    return {"apiVersion": body.get("apiVersion", _PJ_API_VERSION), "kind": body.get("kind", api.KIND),
            "metadata": meta, "spec": dict(body.get("spec") or {}), "status": dict(body.get("status") or {})}


def trim_job(body: Mapping[str, Any]) -> dict:
    spec = {k: v for k, v in (body.get("spec") or {}).items() if k != "template"}
    return {"metadata": _metadata(body, "labels", "ownerReferences", "deletionTimestamp"), "spec": spec,
            "status": dict(body.get("status") or {})}


def trim_pod(body: Mapping[str, Any]) -> dict:
    st = body.get("status") or {}
    return {"metadata": _metadata(body, "labels", "ownerReferences"),
            "status": {k: st[k] for k in ("phase", "containerStatuses", "initContainerStatuses") if k in st}}


def trim_event(body: Mapping[str, Any]) -> dict:
    kept = ("type", "reason", "message", "involvedObject", "firstTimestamp", "lastTimestamp", "eventTime")
    return {"metadata": _metadata(body), **{k: body[k] for k in kept if k in body}}


def _about_pods_or_jobs(body: kopf.Body, **_: Any) -> bool:
    return (body.get("involvedObject") or {}).get("kind") in EVENT_KINDS


@kopf.index(*PJ)
def pj_index(body: kopf.Body, **_: Any) -> dict:
    return {body["metadata"].get("namespace"): trim_pj(body)}


@kopf.index(*JOBS, labels={names.LABEL_MANAGED_BY: OPERATOR_NAME})
def job_index(body: kopf.Body, **_: Any) -> dict:
    return {body["metadata"].get("namespace"): trim_job(body)}


@kopf.index(*PODS, labels={names.LABEL_APP: names.TRAINER_APP})
def pod_index(body: kopf.Body, **_: Any) -> dict:
    return {body["metadata"].get("namespace"): trim_pod(body)}


@kopf.index(*EVENTS, field="type", value="Warning", when=_about_pods_or_jobs)
def event_index(body: kopf.Body, **_: Any) -> dict:
    return {body["metadata"].get("namespace"): trim_event(body)}


def _values(index: Any) -> list[dict]:
    """Every value of a kopf index, copied (list() of a dict runs without a thread switch, so
    the watches' thread may change the index meanwhile)."""
    out: list[dict] = []
    for key in list(index):
        out.extend(list(index.get(key) or ()))
    return out


def _uid(obj: Mapping[str, Any]) -> str:
    return (obj.get("metadata") or {}).get("uid", "")


@dataclass(frozen=True)
class View:
    """One moment of the cluster, as the pump sees it."""
    pjs: list[dict]
    jobs: list[dict]
    pods: list[dict]
    events: list[dict]

    def uids(self) -> set[str]:
        return {_uid(o) for o in (*self.pjs, *self.jobs, *self.pods, *self.events)}

    def without(self, ghosts: Iterable[str]) -> "View":
        gone = set(ghosts)
        if not gone:
            return self
        return View(*([o for o in part if _uid(o) not in gone]
                      for part in (self.pjs, self.jobs, self.pods, self.events)))

    def by_namespace(self) -> dict[str, tuple[dict[str, dict], list[dict], list[dict]]]:
        """Per namespace: its Jobs by name, its trainer pods and its Warning events."""
        out: dict[str, tuple[dict[str, dict], list[dict], list[dict]]] = {}

        def of(obj: dict) -> tuple[dict[str, dict], list[dict], list[dict]]:
            return out.setdefault((obj.get("metadata") or {}).get("namespace", ""), ({}, [], []))

        for job in self.jobs:
            of(job)[0][job["metadata"]["name"]] = job
        for pod in self.pods:
            of(pod)[1].append(pod)
        for event in self.events:
            of(event)[2].append(event)
        return out


@dataclass
class Indexes:
    """The four kopf indexes, as kopf hands them to every handler."""
    pjs: Any
    jobs: Any
    pods: Any
    events: Any
    ghosts: frozenset = field(default_factory=frozenset)

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> Optional["Indexes"]:
        if not all(name in kwargs for name in INDEXES):
            return None
        return cls(*(kwargs[name] for name in INDEXES))

    def view(self) -> View:
        return View(pjs(self.pjs, status.newer), _values(self.jobs), _values(self.pods), _values(self.events)).without(
            self.ghosts)

    def uids(self) -> set[str]:
        """Every object the indexes hold, those left out of views included."""
        return {_uid(o) for index in (self.pjs, self.jobs, self.pods, self.events) for o in _values(index)}

    def forget_missing(self, listed: View, before: set[str]) -> None:
        """Objects the indexes held before the listing `listed` and that it did not find were
        deleted while a watch was away: leave them out from now on."""
        self.ghosts = frozenset(before - listed.uids())


def pjs(index: Any, newer: Any = None) -> list[dict]:
    """The PersonalizationJobs in a kopf index. `newer(namespace, name, uid, resourceVersion)`
    may give a newer copy: the operator's own status writes, which the watch delivers a moment
    later, must count at once (a slot just taken is taken)."""
    out = []
    for pj in _values(index):
        meta = pj["metadata"]
        fresh = newer(meta.get("namespace", ""), meta.get("name", ""), meta.get("uid"),
                      meta.get("resourceVersion")) if newer is not None else None
        out.append(trim_pj(fresh) if fresh is not None else pj)
    return out


def listed(kube: Kube, settings: Settings) -> View:
    """Everything from the API server: one listing per kind (per served namespace)."""
    scopes: list[Optional[str]] = list(settings.namespaces) or [None]
    items: dict[str, list[dict]] = {"pjs": [], "jobs": [], "pods": [], "events": []}
    for ns in scopes:
        items["pjs"] += [trim_pj(o) for o in kube.list(_PJ_API_VERSION, api.KIND, ns)]
        items["jobs"] += [trim_job(o) for o in kube.list("batch/v1", "Job", ns, {names.LABEL_MANAGED_BY: OPERATOR_NAME})]
        items["pods"] += [trim_pod(o) for o in kube.list("v1", "Pod", ns, {names.LABEL_APP: names.TRAINER_APP})]
        items["events"] += [trim_event(o) for o in kube.list("v1", "Event", ns, field_selector={"type": "Warning"})
                            if (o.get("involvedObject") or {}).get("kind") in EVENT_KINDS]
    return View(**items)
