"""Operator faults, scripted in the strict fake API server.

Each scenario ends with the resource in the right state and exactly one of each child:
409 conflicts, 429/500/503 answers (our client and kopf retry with back-off), watch streams that
end with 410 Gone (kopf re-lists and carries on), a Job deleted by hand, and an operator restart
between creating the ConfigMap and the Job.
"""

from __future__ import annotations

import collections

import kubernetes
import pytest

from fake_cluster import PJ, condition, pj_manifest, status_of, wait_for
from pj_operator import kube as kube_module
from pj_operator import metrics
from pj_operator.kube import ApiError, Kube

CHILD_KINDS = ["ConfigMap", "Job", "Role", "RoleBinding", "ServiceAccount"]

FINAL = {
    "progress": {"step": 180, "maxSteps": 400, "percent": 45.0},
    "earlyStop": {"stopped": True, "reason": "ConvergenceThreshold", "criterion": "dvar", "value": 0.12,
                  "threshold": 0.15, "window": 60, "step": 180, "stepsSaved": 220, "fractionSaved": 0.55},
}


def owned_kinds(cluster, name):
    uid = cluster.pj(name)["metadata"]["uid"]
    return sorted(o["kind"] for o in cluster.owned_by(uid))


def run_to_success(cluster, name, attempt=0):
    """Play the Job controller, kubelet and trainer through a successful early stop."""
    wait_for(lambda: cluster.job(name), what=f"Job {name}")
    cluster.start_pod(name, attempt=attempt)
    cluster.pod_running(name, attempt=attempt)
    wait_for(lambda: status_of(cluster, name).get("phase") == "Running", what=f"{name} Running")
    cluster.trainer_reports(name, FINAL)
    cluster.job_succeeded(name, attempt=attempt)
    return wait_for(lambda: status_of(cluster, name).get("phase") == "Succeeded" and status_of(cluster, name),
                    what=f"{name} Succeeded")


def errors(handler):
    return metrics.RECONCILE_ERRORS.labels(handler=handler)._value.get()


# ---- our API client on its own -------------------------------------------------------------------


@pytest.fixture()
def operator_client(cluster, monkeypatch):
    """A Kube like the operator's (not the harness' user agent, so faults apply), recording sleeps."""
    configuration = kubernetes.client.Configuration()
    configuration.host = cluster.url
    client = Kube.for_configuration(configuration, retries=3, backoff=0.5, max_backoff=1.5)
    sleeps = []
    monkeypatch.setattr(kube_module.time, "sleep", sleeps.append)
    yield client, sleeps
    client.close()


def test_client_retries_429_and_5xx_with_backoff_and_honours_retry_after(cluster, operator_client):
    client, sleeps = operator_client
    cluster.create(pj_manifest("x"))
    cluster.inject("get", "personalizationjobs", 429, retry_after=4, client="kube")
    cluster.inject("get", "personalizationjobs", 500, times=2, client="kube")
    assert client.get(*PJ, "default", "x")["metadata"]["name"] == "x"
    # Retry-After wins over the shorter back-off; then 0.5 x 2^n, capped at 1.5.
    assert sleeps == [4.0, 1.0, 1.5]
    assert cluster.server.fired == ["get personalizationjobs -> 429"] + ["get personalizationjobs -> 500"] * 2


def test_client_gives_up_after_its_retries_and_never_retries_a_refusal(cluster, operator_client):
    client, sleeps = operator_client
    cluster.create(pj_manifest("x"))
    cluster.inject("get", "personalizationjobs", 503, times=10, client="kube")
    with pytest.raises(ApiError) as err:
        client.get(*PJ, "default", "x")
    assert err.value.status == 503 and len(sleeps) == 3  # 1 + 3 retries, then the error
    cluster.server.faults.clear()
    sleeps.clear()
    cluster.inject("patch", "personalizationjobs", 403, client="kube")
    with pytest.raises(ApiError) as err:
        client.patch(*PJ, "default", "x", {"metadata": {"labels": {"a": "b"}}})
    assert err.value.status == 403 and sleeps == []


# ---- end to end ------------------------------------------------------------------------------------


def test_conflicts_on_status_patches_and_child_creation(cluster, run_operator):
    # 409 on our status patches: re-read, recompute, patch again. 409 on a create with nothing
    # there (a conflict, not "already exists"): create again. Neither reaches kopf.
    cluster.inject("patch", "personalizationjobs", 409, times=3, subresource="status", client="kube")
    cluster.inject("create", "configmaps", 409, client="kube")
    cluster.inject("create", "jobs", 409, client="kube")
    before = errors("reconcile"), errors("job_event")
    with run_operator():
        cluster.create(pj_manifest("contested"))
        status = run_to_success(cluster, "contested")
    assert condition(status, "Succeeded")["reason"] == "ConvergenceThreshold"
    assert status["earlyStop"] == FINAL["earlyStop"]
    fired = collections.Counter(cluster.server.fired)
    assert fired == {"patch personalizationjobs/status -> 409": 3, "create configmaps -> 409": 1,
                     "create jobs -> 409": 1}
    assert owned_kinds(cluster, "contested") == CHILD_KINDS
    assert (errors("reconcile"), errors("job_event")) == before


def test_throttling_and_server_errors_are_retried_by_both_clients(cluster, run_operator):
    # Our client: 429 on the Job's creation, 500s on status patches and reads.
    cluster.inject("create", "jobs", 429, times=2, retry_after=0, client="kube")
    cluster.inject("patch", "personalizationjobs", 500, times=2, subresource="status", client="kube")
    cluster.inject("get", "personalizationjobs", 503, times=2, client="kube")
    # kopf's own client: its initial listing and its bookkeeping patch (annotations).
    cluster.inject("list", "personalizationjobs", 500, client="kopf")
    cluster.inject("patch", "personalizationjobs", 429, client="kopf")
    before = errors("reconcile"), errors("job_event")
    with run_operator():
        cluster.create(pj_manifest("throttled"))
        status = run_to_success(cluster, "throttled")
    assert condition(status, "Succeeded")["reason"] == "ConvergenceThreshold"
    assert all(f.hits == f.times for f in cluster.server.faults), cluster.server.fired
    assert owned_kinds(cluster, "throttled") == CHILD_KINDS
    assert len([r for r in cluster.creations("jobs") if r.headers.get("User-Agent", "").startswith("OpenAPI")]) == 3
    # Retried inside the client: no handler failed, no ChildCreationFailed was reported.
    assert (errors("reconcile"), errors("job_event")) == before
    assert not [e for e in cluster.events_for("throttled") if e["reason"] == "ChildCreationFailed"]


def test_watch_streams_ending_with_410_gone_are_relisted(cluster, run_operator):
    with run_operator():
        cluster.create(pj_manifest("gone"))
        wait_for(lambda: cluster.job("gone"))
        cluster.start_pod("gone")
        cluster.pod_running("gone")
        wait_for(lambda: status_of(cluster, "gone").get("phase") == "Running")

        since = len(cluster.requests)
        cluster.expire_watches("jobs")
        cluster.expire_watches("personalizationjobs")
        # What happens now may fall into the gap between the old stream and the new one.
        cluster.trainer_reports("gone", FINAL)
        cluster.job_succeeded("gone")
        cluster.create(pj_manifest("after-gone"))

        status = wait_for(lambda: status_of(cluster, "gone").get("phase") == "Succeeded" and status_of(cluster, "gone"))
        assert condition(status, "Succeeded")["reason"] == "ConvergenceThreshold"
        wait_for(lambda: cluster.job("after-gone"), what="a resource created after the 410")
        assert cluster.server.expired_streams.get("jobs", 0) >= 1
        assert cluster.server.expired_streams.get("personalizationjobs", 0) >= 1
        # kopf listed both resources again, then watched again.
        relisted = {r.resource.plural for r in cluster.operator_requests(since)
                    if r.action is not None and r.action.name == "LIST" and r.resource is not None}
        assert {"jobs", "personalizationjobs"} <= relisted
    assert len(cluster.creations("jobs")) == 2
    assert owned_kinds(cluster, "gone") == CHILD_KINDS


def test_job_deleted_by_hand_after_the_trainers_decision_keeps_the_decision(cluster, run_operator):
    """JobLost is only for Jobs that vanish without a decision (test_failures covers that)."""
    with run_operator():
        cluster.create(pj_manifest("tidy"))
        wait_for(lambda: cluster.job("tidy"))
        cluster.start_pod("tidy")
        cluster.pod_running("tidy")
        wait_for(lambda: status_of(cluster, "tidy").get("phase") == "Running")
        cluster.trainer_reports("tidy", FINAL)
        cluster.delete("batch/v1", "Job", "default", "tidy")
        status = wait_for(lambda: status_of(cluster, "tidy").get("phase") == "Succeeded" and status_of(cluster, "tidy"))
        assert condition(status, "Succeeded")["reason"] == "ConvergenceThreshold"
    assert len(cluster.creations("jobs")) == 1


def test_restart_between_the_configmap_and_the_job(cluster, run_operator):
    # The API server refuses Jobs until the operator is stopped: it dies after the ConfigMap
    # (and the RBAC objects) exist and before the Job does.
    outage = cluster.inject("create", "jobs", 503, times=10_000, client="kube")
    with run_operator():
        cluster.create(pj_manifest("interrupted"))
        wait_for(lambda: cluster.get("v1", "ConfigMap", "default", "interrupted-config"))
        cond = wait_for(lambda: (condition(status_of(cluster, "interrupted"), "Running") or {}).get("reason")
                        == "ChildCreationFailed" and condition(status_of(cluster, "interrupted"), "Running"))
        assert "cannot create Job interrupted" in cond["message"]
        assert status_of(cluster, "interrupted")["jobName"] == "interrupted"
        assert cluster.job("interrupted") is None
    outage.times = outage.hits  # the API server is healthy again
    with run_operator():
        status = run_to_success(cluster, "interrupted")
    assert condition(status, "Succeeded")["reason"] == "ConvergenceThreshold"
    assert owned_kinds(cluster, "interrupted") == CHILD_KINDS
    uid = cluster.pj("interrupted")["metadata"]["uid"]
    kinds_created = collections.Counter(o["kind"] for o in cluster.owned_by(uid))
    assert kinds_created == {k: 1 for k in CHILD_KINDS}
    # After the restart the ConfigMap was created again, answered 409, and accepted as ours.
    assert len(cluster.creations("configmaps")) >= 2 and len(cluster.get("v1", "ConfigMap", "default",
                                                                           "interrupted-config")["data"]) == 1
