"""What a real cluster does and a plain fake API server hides: pods that never start, a garbage
collector that lags, an API server that hangs or goes away, non-finite numbers, labels that are
not ours. Each case runs end to end against the strict fake API server (fake_apiserver.py)."""

from __future__ import annotations

import json
import time

import pytest

from fake_cluster import PJ, condition, pj_manifest, status_of, wait_for
from pj_operator import names

FINAL = {
    "progress": {"step": 180, "maxSteps": 400, "percent": 45.0},
    "earlyStop": {"stopped": True, "reason": "ConvergenceThreshold", "criterion": "dvar", "value": 0.12,
                  "threshold": 0.15, "window": 60, "step": 180, "stepsSaved": 220, "fractionSaved": 0.55},
}


def phase(cluster, name):
    return status_of(cluster, name).get("phase")


def failed_with(cluster, name):
    status = wait_for(lambda: phase(cluster, name) == "Failed" and status_of(cluster, name), what=f"{name} Failed")
    return condition(status, "Failed")


# ---- pods that can never start -------------------------------------------------------------------


def test_a_pod_that_cannot_read_its_secret_fails_the_job_and_frees_its_slot(cluster, run_operator):
    with run_operator(PJ_MAX_CONCURRENT_JOBS="1", PJ_START_FAILURE_GRACE_SECONDS="0"):
        cluster.create(pj_manifest("typo", output={"path": "x", "claimName": "artifacts", "uri": "s3://b/runs",
                                                   "secretRef": {"name": "s3-credz"}}))
        wait_for(lambda: cluster.job("typo"))
        cluster.create(pj_manifest("next"))
        wait_for(lambda: phase(cluster, "next") == "Queued")
        cluster.start_pod("typo")
        cluster.pod_waiting("typo", "CreateContainerConfigError", 'secret "s3-credz" not found')
        failed = failed_with(cluster, "typo")
        assert failed["reason"] == "CreateContainerConfigError"
        assert 'secret "s3-credz" not found' in failed["message"]
        # The Job goes (its pod would hold the node's GPU) and the slot passes to the next job.
        wait_for(lambda: cluster.job("typo") is None, what="the Job's deletion")
        wait_for(lambda: cluster.job("next"), what="the queued job admitted")


def test_pod_creation_refused_by_quota_priority_class_or_webhook_fails_with_the_controllers_message(
        cluster, run_operator):
    refusals = {
        "quota": 'pods "quota-x" is forbidden: exceeded quota: gpu-quota, requested: nvidia.com/gpu=1',
        "prio": 'pods "prio-x" is forbidden: no PriorityClass with name urgent was found',
        "hook": 'admission webhook "policy.example.com" denied the request: GPUs need a cost center label',
    }
    with run_operator(PJ_START_FAILURE_GRACE_SECONDS="0"):
        for name in refusals:
            cluster.create(pj_manifest(name))
        for name, message in refusals.items():
            wait_for(lambda: cluster.job(name), what=f"Job {name}")
            cluster.job_failed_create(name, message)
        for name, message in refusals.items():
            failed = failed_with(cluster, name)
            assert failed["reason"] == "FailedCreate" and message in failed["message"]


def test_a_read_write_once_output_volume_in_use_elsewhere_fails_the_job(cluster, run_operator):
    with run_operator(PJ_START_FAILURE_GRACE_SECONDS="0"):
        cluster.create(pj_manifest("attached"))
        wait_for(lambda: cluster.job("attached"))
        cluster.start_pod("attached")
        cluster.pod_waiting("attached", "ContainerCreating", "")
        cluster.event_on("Pod", "attached-0", "FailedAttachVolume",
                         'Multi-Attach error for volume "pvc-123" Volume is already exclusively attached to '
                         'one node and can\'t be attached to another', component="attachdetach-controller")
        failed = failed_with(cluster, "attached")
        assert failed["reason"] == "FailedAttachVolume" and "Multi-Attach" in failed["message"]


def test_image_pull_backoff_within_the_grace_period_is_waited_out(cluster, run_operator):
    with run_operator(PJ_IMAGE_PULL_GRACE_SECONDS="600"):
        cluster.create(pj_manifest("blip"))
        wait_for(lambda: cluster.job("blip"))
        cluster.start_pod("blip")
        cluster.pod_image_pull_backoff("blip")
        # The pump looks at the stuck pod at every tick (from its watch: no request to count).
        time.sleep(1.5)  # five ticks (PJ_POLL_INTERVAL=0.3, conftest.py)
        assert phase(cluster, "blip") == "Pending" and cluster.job("blip")
        # The registry is back: the kubelet's next pull works.
        cluster.pod_running("blip")
        wait_for(lambda: phase(cluster, "blip") == "Running")
        assert len(cluster.creations("jobs")) == 1


def test_a_pod_pending_past_the_deadline_fails_with_what_holds_it(cluster, run_operator):
    with run_operator(PJ_PENDING_DEADLINE_SECONDS="1"):
        cluster.create(pj_manifest("unschedulable"))
        wait_for(lambda: cluster.job("unschedulable"))
        cluster.start_pod("unschedulable")
        cluster.event_on("Pod", "unschedulable-0", "FailedScheduling",
                         "0/4 nodes are available: 4 Insufficient nvidia.com/gpu.", component="default-scheduler")
        failed = failed_with(cluster, "unschedulable")
        assert failed["reason"] == "PendingDeadlineExceeded"
        assert "Insufficient nvidia.com/gpu" in failed["message"]
        wait_for(lambda: cluster.job("unschedulable") is None, what="the Job's deletion")


# ---- delete and re-create ------------------------------------------------------------------------


def test_recreating_a_job_waits_for_the_garbage_collector_instead_of_failing(cluster, run_operator):
    with run_operator(PJ_RETRY_DELAY="0.3"):
        old = cluster.create(pj_manifest("again"))
        wait_for(lambda: cluster.job("again"))
        cluster.pause_gc()
        wait_for(lambda: cluster.server.gc_paused)
        cluster.delete(*PJ, "default", "again")
        wait_for(lambda: cluster.pj("again") is None)
        new = cluster.create(pj_manifest("again", training={"maxSteps": 500}))
        waiting = wait_for(lambda: (condition(status_of(cluster, "again"), "Running") or {}).get("reason")
                           == "WaitingForPredecessor" and condition(status_of(cluster, "again"), "Running"))
        assert "still owned by an earlier PersonalizationJob" in waiting["message"]
        assert phase(cluster, "again") != "Failed"
        assert cluster.job("again")["metadata"]["ownerReferences"][0]["uid"] == old["metadata"]["uid"]
        cluster.resume_gc()
        job = wait_for(lambda: (cluster.job("again") or {}).get("metadata", {}).get("ownerReferences", [{}])[0]
                       .get("uid") == new["metadata"]["uid"] and cluster.job("again"), what="the new Job")
        config = cluster.get("v1", "ConfigMap", "default", "again-config")
        assert "maxSteps: 500" in config["data"]["job.yaml"] and job
        assert phase(cluster, "again") == "Pending"


# ---- resync and timeouts -------------------------------------------------------------------------


def test_a_completion_missed_while_the_api_was_down_is_picked_up_by_the_resync(cluster, run_operator):
    with run_operator(PJ_API_RETRIES="1"):
        cluster.create(pj_manifest("missed"))
        wait_for(lambda: cluster.job("missed"))
        cluster.start_pod("missed")
        cluster.pod_running("missed")
        wait_for(lambda: phase(cluster, "missed") == "Running")
        cluster.trainer_reports("missed", FINAL)
        # The API server refuses the operator's status writes long enough for its retries to end.
        fault = cluster.inject("patch", "personalizationjobs", 503, times=4, subresource="status", client="kube")
        cluster.job_succeeded("missed")
        wait_for(lambda: fault.hits >= 2, what="the lost status write")
        status = wait_for(lambda: phase(cluster, "missed") == "Succeeded" and status_of(cluster, "missed"),
                          what="the resync")
        assert condition(status, "Succeeded")["reason"] == "ConvergenceThreshold"


def test_watches_and_requests_have_timeouts(cluster, run_operator):
    cluster.inject("create", "configmaps", 0, hang=30.0, client="kube")
    with run_operator(PJ_API_TIMEOUT="0.5", PJ_WATCH_TIMEOUT="120"):
        watches = [r for r in cluster.requests if r.action is not None and r.action.name == "WATCH"
                   and r.resource is not None and r.resource.plural in ("jobs", "personalizationjobs")]
        assert watches and all(r.params.get("timeoutSeconds") == "120" for r in watches)
        cluster.create(pj_manifest("slow-api"))
        # The first child's creation hangs; the operator gives up on it and asks again.
        wait_for(lambda: cluster.job("slow-api"), what="the Job despite a hanging request")
        assert any("hang" in fired for fired in cluster.server.fired)


def test_the_job_watch_selects_the_operators_jobs_on_the_server(cluster, run_operator):
    with run_operator():
        watches = [r for r in cluster.requests if r.action is not None and r.action.name in ("WATCH", "LIST")
                   and r.resource is not None and r.resource.plural == "jobs"
                   and "fieldSelector" not in r.params]
        assert watches
        assert all(r.params.get("labelSelector") == f"{names.LABEL_MANAGED_BY}=personalization-operator"
                   for r in watches)


# ---- the trainer's final report ------------------------------------------------------------------


def test_a_trainer_whose_final_patch_failed_exits_3_and_the_job_succeeds_from_its_message(cluster, run_operator):
    report = dict(FINAL, deterministicLoss=float("nan"), artifact={"location": "/output/runs/x",
                                                                    "files": ["learned_embeds.safetensors"]})
    # Python writes NaN for a diverged loss; the kubelet passes the text on unchanged.
    message = json.dumps(report, separators=(",", ":"))
    assert "NaN" in message
    with run_operator():
        cluster.create(pj_manifest("unreported"))
        wait_for(lambda: cluster.job("unreported"))
        cluster.start_pod("unreported")
        cluster.pod_running("unreported")
        wait_for(lambda: phase(cluster, "unreported") == "Running")
        action = cluster.pod_failed("unreported", exit_code=names.EXIT_STATUS_UNREPORTED, message=message)
        assert action == "FailJob"  # never retried: the run is done
        status = wait_for(lambda: phase(cluster, "unreported") == "Succeeded" and status_of(cluster, "unreported"))
        assert condition(status, "Succeeded")["reason"] == "ConvergenceThreshold"
        assert status["earlyStop"]["stepsSaved"] == 220
        assert status["artifact"]["location"] == "/output/runs/x"
        assert "deterministicLoss" not in status  # NaN is not JSON: null, never sent as NaN
        assert len(cluster.creations("jobs")) == 1


# ---- labels --------------------------------------------------------------------------------------


def test_children_carry_only_the_operators_labels(cluster, run_operator):
    manifest = pj_manifest("tagged")
    manifest["metadata"]["labels"] = {"argocd.argoproj.io/instance": "team-apps", "team": "vision"}
    with run_operator():
        cluster.create(manifest)
        job = wait_for(lambda: cluster.job("tagged"))
        uid = cluster.pj("tagged")["metadata"]["uid"]
        for child in cluster.owned_by(uid):
            assert set(child["metadata"].get("labels", {})) == set(names.child_labels("tagged")), child["kind"]
        assert set(job["spec"]["template"]["metadata"]["labels"]) == set(names.pod_labels("tagged", "textualInversion"))
        assert not job["spec"].get("suspend")


# ---- request count -------------------------------------------------------------------------------


# The concurrency cap (on by default) adds its admission check: a list of the jobs and one of the
# PriorityClasses.
@pytest.mark.parametrize("cap, most", [("0", 10), ("4", 12)], ids=["no-cap", "cap"])
def test_one_lifecycle_costs_at_most_ten_requests_plus_two_for_the_cap(cluster, run_operator, cap, most):
    with run_operator(PJ_POLL_INTERVAL="3600", PJ_MAX_CONCURRENT_JOBS=cap):
        mark = len(cluster.requests)
        cluster.create(pj_manifest("frugal"))
        wait_for(lambda: cluster.job("frugal"))
        cluster.start_pod("frugal")
        cluster.pod_running("frugal")
        wait_for(lambda: phase(cluster, "frugal") == "Running")
        cluster.trainer_reports("frugal", {"progress": {"step": 50, "maxSteps": 400, "percent": 12.5}})
        cluster.trainer_reports("frugal", FINAL)
        # In a cluster the Job completes seconds after the trainer's last patch (the pod exits, then
        # the kubelet and the Job controller report it): the operator's watch has the final status
        # by then. Completing it at once would race that watch event and cost one more read.
        time.sleep(0.5)
        cluster.job_succeeded("frugal")
        wait_for(lambda: phase(cluster, "frugal") == "Succeeded")
        wait_for(lambda: [e for e in cluster.events_for("frugal") if e["reason"].startswith("Succeeded/")])
        by_verb = cluster.requests_by_verb(cluster.operator_requests(mark))
        assert sum(by_verb.values()) <= most, by_verb
