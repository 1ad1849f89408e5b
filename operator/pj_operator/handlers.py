"""The kopf handlers: thin adapters from kopf's callbacks to `reconcile` (which does the work).

Handlers are synchronous (the `kubernetes` client is): kopf runs them in its thread pool.
They return None so kopf writes nothing into status; kopf's own bookkeeping lives in
annotations under the API group (see `configure`).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import kopf

from personalize import spec as api

from . import job_table, lifecycle, metrics, names, pack_handlers, reconcile, status, watched  # noqa: F401 (registers)
from .pack_book import BOOK
from .kube import Kube
from .pump import Pump
from .settings import OPERATOR_NAME, Settings

PJ = (api.API_GROUP, api.API_VERSION, api.PLURAL)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The pod's service account in a cluster, else $KUBECONFIG (read now, not at import time)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=api.API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=api.API_GROUP, key="last-handled-configuration")
    settings.persistence.finalizer = f"{api.API_GROUP}/finalizer"
    # Only our own events (kopf.event) and kopf's warnings/errors become Kubernetes Events.
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = 8
    memo.config = Settings.from_env()
    # Watch only our own Jobs: the API server filters, so other Jobs never reach the operator.
    settings.watching.label_selectors["batch", "jobs"] = f"{names.LABEL_MANAGED_BY}={OPERATOR_NAME}"
    watched.configure(settings)  # and only trainer pods, and only Warning events
    # The server ends every watch stream after this long (an integer, as the API requires) and
    # kopf opens a new one; no request waits forever while a per-resource lock is held.
    settings.watching.server_timeout = int(memo.config.watch_timeout)
    settings.watching.client_timeout = int(memo.config.watch_timeout) + 60
    settings.networking.request_timeout = memo.config.api_timeout
    memo.kube = Kube.from_environment(retries=memo.config.api_retries, backoff=memo.config.api_backoff,
                                      timeout=memo.config.api_timeout)
    memo.pump = Pump(memo.kube, memo.config)
    BOOK.clear()  # refilled by the watches' initial listings (pack_handlers)
    logger.info("serving %s with %s", ", ".join(memo.config.namespaces) or "all namespaces", memo.config)


@kopf.on.cleanup()
def shutdown(memo: kopf.Memo, **_: Any) -> None:
    if getattr(memo, "pump", None) is not None:
        memo.pump.stop()
    if getattr(memo, "kube", None) is not None:
        memo.kube.close()


@kopf.on.create(*PJ)
@kopf.on.resume(*PJ)
@metrics.counting_errors("reconcile")
def on_create_or_resume(body: kopf.Body, memo: kopf.Memo, pj_index: kopf.Index, **_: Any) -> None:
    status.remember(body)
    reconcile.reconcile(memo.kube, dict(body), memo.config, everyone=lambda: watched.pjs(pj_index, status.newer))


@kopf.on.update(*PJ, field="spec")
@metrics.counting_errors("spec_change")
def on_spec_change(body: kopf.Body, diff: kopf.Diff, memo: kopf.Memo, pj_index: kopf.Index, **_: Any) -> None:
    status.remember(body)
    if (body.get("status") or {}).get("jobName"):
        changed = sorted({".".join(("spec",) + tuple(d[1])) for d in diff})
        reconcile.refuse_change(memo.kube, dict(body), changed)
    else:
        reconcile.reconcile(memo.kube, dict(body), memo.config,
                            everyone=lambda: watched.pjs(pj_index, status.newer))


@kopf.on.event(*PJ)
def on_pj_event(type: Optional[str], body: kopf.Body, memo: kopf.Memo, **kwargs: Any) -> None:
    """Keep the jobs-by-phase gauge and the latest copy of the resource current (caches of the
    watch; they decide nothing). Hands kopf's indexes to the queue pump."""
    memo.pump.ensure_started(watched.Indexes.from_kwargs(kwargs))
    if type is None:  # the watch listed again (at the start, or after its stream expired)
        memo.pump.list_again()
    uid = body.get("metadata", {}).get("uid", "")
    if type == "DELETED":
        metrics.PHASES.forget(uid)
        job_table.JOBS.forget(uid)
        status.forget(body["metadata"].get("namespace", ""), body["metadata"].get("name", ""))
    else:
        metrics.PHASES.observe(uid, (body.get("status") or {}).get("phase"))
        job_table.JOBS.observe(body)  # the fleet dashboard's job table
        status.remember(body)  # the latest copy: status writes then need no read


def _owner_uid(job: kopf.Body) -> str | None:
    for ref in job.get("metadata", {}).get("ownerReferences", []):
        if ref.get("kind") == api.KIND and ref.get("apiVersion") == names.PJ_API_VERSION:
            return ref.get("uid")
    return None


@kopf.on.event("batch", "v1", "jobs", labels={names.LABEL_MANAGED_BY: OPERATOR_NAME})
@metrics.counting_errors("job_event")
def on_job_event(type: Optional[str], body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    if type is None:  # the watch listed again: Jobs deleted meanwhile are still in the index
        memo.pump.list_again()
    owner = _owner_uid(body)
    pj_name = body.get("metadata", {}).get("labels", {}).get(names.LABEL_JOB)
    if owner is None or not pj_name:
        return
    namespace = body["metadata"]["namespace"]
    job = None if type == "DELETED" else dict(body)
    # A failed Job's pods say why (OOMKilled, bad input, a run that finished unreported).
    pods = reconcile.job_pods(memo.kube, namespace, pj_name) if lifecycle.job_condition(job, "Failed") else []
    reconcile.sync_lifecycle(memo.kube, namespace, pj_name, job, pods, owner_uid=owner)
