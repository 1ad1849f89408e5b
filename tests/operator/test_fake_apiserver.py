"""The fixture itself: it must refuse what a real API server refuses, or the e2e tests prove little."""

from __future__ import annotations

import kubernetes
import pytest

from fake_cluster import PJ, pj_manifest, wait_for
from pj_operator.kube import ApiError, Kube


def test_invalid_builtin_objects_are_refused(cluster):
    bad_job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j", "namespace": "default"},
               "spec": {"template": {"spec": {"containers": [{"name": "c", "imagePullPolicy": "Sometimes?",
                                                              "unknownField": 1}]}}}}
    with pytest.raises(ApiError) as err:
        cluster.create(bad_job)
    assert err.value.status == 422
    assert len(cluster.server.violations) == 1
    cluster.server.violations.clear()


def test_custom_resources_are_checked_against_the_crd(cluster):
    with pytest.raises(ApiError):
        cluster.create(pj_manifest("x", method="magic"))
    cluster.server.violations.clear()
    created = cluster.create(pj_manifest("x"))
    assert created["metadata"]["uid"] and created["metadata"]["generation"] == 1


def test_status_and_spec_are_separate_and_generation_follows_spec(cluster):
    cluster.create(pj_manifest("x"))
    cluster.kube.patch(*PJ, "default", "x", {"status": {"phase": "Running"}})  # main resource: status ignored
    assert "status" not in cluster.pj("x")
    cluster.patch_status(*PJ, "default", "x", {"phase": "Running"})
    cluster.kube.patch(*PJ, "default", "x", {"metadata": {"labels": {"a": "b"}}})
    assert cluster.pj("x")["metadata"]["generation"] == 1
    cluster.kube.patch(*PJ, "default", "x", {"spec": {"backoffLimit": 3}})
    pj = cluster.pj("x")
    assert pj["metadata"]["generation"] == 2 and pj["status"]["phase"] == "Running"


def test_garbage_collection_is_asynchronous_and_follows_owners_transitively(cluster):
    owner = cluster.create(pj_manifest("owner"))
    ref = {"apiVersion": PJ[0], "kind": "PersonalizationJob", "name": "owner", "uid": owner["metadata"]["uid"]}
    job = cluster.create({"apiVersion": "batch/v1", "kind": "Job",
                          "metadata": {"name": "owner", "namespace": "default", "ownerReferences": [ref]},
                          "spec": {"template": {"spec": {"restartPolicy": "Never",
                                                         "containers": [{"name": "c", "image": "i"}]}}}})
    cluster.start_pod("owner")
    cluster.pause_gc()
    cluster.delete(*PJ, "default", "owner")
    # A paused (busy) collector leaves the dependents in place: a real window, seconds long.
    wait_for(lambda: cluster.server.gc_paused)
    assert cluster.job("owner")["metadata"]["uid"] == job["metadata"]["uid"]
    cluster.resume_gc()
    wait_for(lambda: cluster.job("owner") is None and cluster.get("v1", "Pod", "default", "owner-0") is None,
             what="the Job, then its pod, collected")
    assert cluster.server.collected == ["Job/owner", "Pod/owner-0"]


def test_non_finite_numbers_are_not_json_and_get_400(cluster):
    cluster.create(pj_manifest("x"))
    with pytest.raises(ApiError) as err:
        cluster.patch_status(*PJ, "default", "x", {"deterministicLoss": float("nan")})
    assert err.value.status == 400 and "NaN" in str(err.value)
    with pytest.raises(ApiError):
        cluster.patch_status(*PJ, "default", "x", {"convergenceValue": float("inf")})
    assert "deterministicLoss" not in (cluster.pj("x").get("status") or {})


def test_selectors_filter_lists(cluster):
    for name, managed in (("ours", "personalization-operator"), ("theirs", "someone-else")):
        cluster.create({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": name, "namespace": "default",
                                     "labels": {"app.kubernetes.io/managed-by": managed}}})
    selected = cluster.kube.list("v1", "ConfigMap", "default",
                                 label_selector={"app.kubernetes.io/managed-by": "personalization-operator"})
    assert [c["metadata"]["name"] for c in selected] == ["ours"]
    raw = cluster.kube.request("GET", "/api/v1/namespaces/default/configmaps",
                               query={"labelSelector": "app.kubernetes.io/managed-by!=personalization-operator"})
    assert [c["metadata"]["name"] for c in raw["items"]] == ["theirs"]
    raw = cluster.kube.request("GET", "/api/v1/namespaces/default/configmaps", query={"fieldSelector": "metadata.name=theirs"})
    assert [c["metadata"]["name"] for c in raw["items"]] == ["theirs"]


def test_job_failed_create_events_and_stuck_pods_that_recover(cluster):
    cluster.create({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j", "namespace": "default"},
                    "spec": {"template": {"metadata": {"labels": {"a": "b"}},
                                          "spec": {"restartPolicy": "Never",
                                                   "containers": [{"name": "trainer", "image": "i"}]}}}})
    event = cluster.job_failed_create("j", 'pods "j-abc" is forbidden: exceeded quota: gpu')
    assert event["involvedObject"]["kind"] == "Job" and event["reason"] == "FailedCreate"
    cluster.start_pod("j")
    cluster.pod_waiting("j", "CreateContainerConfigError", 'secret "s3-creds" not found')
    waiting = cluster.get("v1", "Pod", "default", "j-0")["status"]["containerStatuses"][0]["state"]["waiting"]
    assert waiting["reason"] == "CreateContainerConfigError"
    cluster.pod_running("j")
    assert cluster.get("v1", "Pod", "default", "j-0")["status"]["phase"] == "Running"


def test_hanging_requests_answer_late(cluster):
    configuration = kubernetes.client.Configuration()
    configuration.host = cluster.url
    client = Kube.for_configuration(configuration, retries=0, timeout=0.3)
    cluster.create(pj_manifest("x"))
    cluster.inject("get", "personalizationjobs", 0, hang=2.0, client="kube")
    with pytest.raises(ApiError) as err:
        client.get(*PJ, "default", "x")
    assert err.value.status == 0 and "no answer" in str(err.value)
    client.close()


def test_stale_resource_version_in_a_patch_is_a_conflict(cluster):
    created = cluster.create(pj_manifest("x"))
    cluster.patch_status(*PJ, "default", "x", {"phase": "Pending"})
    with pytest.raises(ApiError) as err:
        cluster.kube.patch(*PJ, "default", "x", {"metadata": {"resourceVersion": created["metadata"]["resourceVersion"]},
                                                 "status": {"phase": "Running"}}, subresource="status")
    assert err.value.status == 409
    assert cluster.pj("x")["status"]["phase"] == "Pending"


def test_watch_timeouts_must_be_integers(cluster):
    with pytest.raises(ApiError) as err:
        cluster.kube.request("GET", "/api/v1/namespaces/default/configmaps", query={"timeoutSeconds": "300.0"})
    assert err.value.status == 400
    assert cluster.kube.request("GET", "/api/v1/namespaces/default/configmaps", query={"timeoutSeconds": "300"})


def watched_names(cluster, query: str) -> list[tuple[str, str]]:
    """(type, name) of the events a ConfigMap watch stream sends before 1 s of silence."""
    import json
    import urllib.request

    events = []
    with urllib.request.urlopen(f"{cluster.url}/api/v1/namespaces/default/configmaps?watch=true{query}",
                                timeout=1.0) as stream:
        try:
            for line in iter(stream.readline, b""):
                if line.strip():
                    events.append(json.loads(line))
        except TimeoutError:
            pass  # the stream stays open: what came before the silence is what it sends
    return [(e["type"], e["object"]["metadata"]["name"]) for e in events]


def test_a_watch_from_a_resource_version_sends_only_later_changes_when_asked(cluster):
    def config_map(name: str) -> dict:
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "namespace": "default"}}

    cluster.create(config_map("old"))
    # kmock's own way, kept for the tests: every stream starts with every object
    assert watched_names(cluster, "&resourceVersion=999999") == [("ADDED", "old")]

    cluster.server.watches_resume = True  # a real API server's way
    listed = cluster.kube.request("GET", "/api/v1/namespaces/default/configmaps")
    version = listed["metadata"]["resourceVersion"]
    assert version == cluster.kube.get("v1", "ConfigMap", "default", "old")["metadata"]["resourceVersion"]
    cluster.create(config_map("new"))
    assert watched_names(cluster, f"&resourceVersion={version}") == [("ADDED", "new")]
    assert watched_names(cluster, "") == [("ADDED", "old"), ("ADDED", "new")]  # no version: everything
