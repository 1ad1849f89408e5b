"""The kopf handlers of packing: thin adapters to `pack_reconcile` (imported by handlers.py).

The two index handlers keep the pack book: kopf runs them for every object of its initial
listings before it runs any other handler, so a restarted operator knows every pack before its
first decision. They store nothing in kopf's own indexes.
"""

from __future__ import annotations

from typing import Any

import kopf

from personalize import spec as api

from . import lifecycle, metrics, names, pack_reconcile, reconcile
from .pack_book import BOOK
from .settings import OPERATOR_NAME

PJ = (api.API_GROUP, api.API_VERSION, api.PLURAL)
PACK_JOBS = dict(labels={names.LABEL_MANAGED_BY: OPERATOR_NAME, names.LABEL_PACK: kopf.PRESENT})


@kopf.index(*PJ)
def pack_book_members(body: kopf.Body, **_: Any) -> None:
    BOOK.observe_member(dict(body))


@kopf.index("batch", "v1", "jobs", **PACK_JOBS)
def pack_book_jobs(body: kopf.Body, **_: Any) -> None:
    BOOK.observe_job(dict(body))


@kopf.on.event(*PJ)
@metrics.counting_errors("pack_member")
def on_member_event(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """A member deleted leaves its pack; a member whose trainer reported its end finishes."""
    if type == "DELETED":
        meta = body.get("metadata", {})
        pack_reconcile.leave(memo.kube, meta.get("namespace", ""), meta.get("name", ""), memo.config)
    elif pack_reconcile.is_packed(body):
        pack_reconcile.member_reported(memo.kube, dict(body), memo.config)


@kopf.on.event("batch", "v1", "jobs", **PACK_JOBS)
@metrics.counting_errors("pack_job_event")
def on_pack_job_event(type: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """The pack's Job moved: every unfinished member follows it; members the pack ended before
    its trainer took them up are packed again."""
    pack = BOOK.observe_job(dict(body), deleted=type == "DELETED")
    if not pack:
        return
    namespace = body["metadata"]["namespace"]
    job = None if type == "DELETED" else dict(body)
    pods = pack_reconcile.pack_pods(memo.kube, namespace, pack) if lifecycle.job_condition(job, "Failed") else []
    for member in pack_reconcile.sync_pack(memo.kube, namespace, pack, job, memo.config, pods=pods):
        reconcile.reconcile(memo.kube, member, memo.config)
