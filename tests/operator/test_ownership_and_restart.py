"""Deletion removes everything owned; an operator restart mid-lifecycle duplicates nothing."""

from __future__ import annotations

from fake_cluster import PJ, pj_manifest, wait_for


def test_deleting_the_resource_removes_everything_it_owns(cluster, run_operator):
    with run_operator():
        created = cluster.create(pj_manifest("doomed"))
        wait_for(lambda: cluster.job("doomed"))
        cluster.start_pod("doomed")
        uid = created["metadata"]["uid"]
        assert len(cluster.owned_by(uid)) == 5
        pj = cluster.pj("doomed")
        # No finalizer of ours: deletion never waits for the operator.
        assert not pj["metadata"].get("finalizers")
        assert cluster.delete(*PJ, "default", "doomed")
        wait_for(lambda: cluster.pj("doomed") is None)
        # The garbage collector follows ownerReferences, a while later: children, then the Job's pod.
        wait_for(lambda: cluster.owned_by(uid) == [] and cluster.get("v1", "Pod", "default", "doomed-0") is None,
                 what="the garbage collector")
        assert sorted(cluster.server.collected) == sorted([
            "ConfigMap/doomed-config", "ServiceAccount/doomed-trainer", "Role/doomed-trainer",
            "RoleBinding/doomed-trainer", "Job/doomed", "Pod/doomed-0"])
        # The operator does not resurrect anything for the deleted resource.
        assert len(cluster.creations("jobs")) == 1


def test_restart_mid_lifecycle_creates_no_duplicates_and_keeps_following(cluster, run_operator):
    with run_operator():
        cluster.create(pj_manifest("durable"))
        wait_for(lambda: cluster.job("durable"))
        cluster.start_pod("durable")
        cluster.pod_running("durable")
        wait_for(lambda: (cluster.pj("durable")["status"]).get("phase") == "Running")
    creates_before = len([r for r in cluster.requests if r.action is not None and r.action.name == "CREATE"
                          and r.resource.plural != "events"])

    # While the operator is down the trainer reports and the Job completes.
    cluster.trainer_reports("durable", {"progress": {"step": 400, "maxSteps": 400, "percent": 100.0},
                                        "earlyStop": {"stopped": False, "reason": "MaxSteps", "step": 400,
                                                      "stepsSaved": 0}})
    cluster.job_succeeded("durable")

    with run_operator():
        status = wait_for(lambda: cluster.pj("durable")["status"].get("phase") == "Succeeded"
                          and cluster.pj("durable")["status"])
        assert next(c for c in status["conditions"] if c["type"] == "Succeeded")["reason"] == "MaxSteps"
    creates_after = len([r for r in cluster.requests if r.action is not None and r.action.name == "CREATE"
                         and r.resource.plural != "events"])
    # Two pods were created by the test (the kubelet's part); nothing else was created after the restart.
    assert creates_after == creates_before
    assert len(cluster.creations("jobs")) == 1 and len(cluster.creations("configmaps")) == 1


def test_restart_after_a_crash_between_admission_and_job_creation(cluster, run_operator):
    """Status says admitted (jobName) but some children were never created: resume creates the rest."""
    with run_operator():
        created = cluster.create(pj_manifest("half"))
        wait_for(lambda: cluster.job("half"))
    # Simulate the crash window: the Job and the RoleBinding vanish as if never created.
    cluster.delete("batch/v1", "Job", "default", "half")
    cluster.delete("rbac.authorization.k8s.io/v1", "RoleBinding", "default", "half-trainer")
    assert cluster.pj("half")["status"]["jobName"] == "half"
    with run_operator():
        wait_for(lambda: cluster.job("half"), what="the Job re-created on resume")
        wait_for(lambda: cluster.get("rbac.authorization.k8s.io/v1", "RoleBinding", "default", "half-trainer"))
        kinds = sorted(o["kind"] for o in cluster.owned_by(created["metadata"]["uid"]))
        assert kinds == ["ConfigMap", "Job", "Role", "RoleBinding", "ServiceAccount"]
        assert cluster.pj("half")["status"]["phase"] == "Pending"
