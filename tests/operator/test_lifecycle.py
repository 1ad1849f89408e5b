"""End to end against the strict fake cluster: one PersonalizationJob from creation to the end."""

from __future__ import annotations

from fake_cluster import condition, pj_manifest, status_of, wait_for

from pj_operator import metrics


def phase(cluster, name):
    return status_of(cluster, name).get("phase")


TRAINER_FINAL = {
    "progress": {"step": 180, "maxSteps": 400, "percent": 45.0},
    "deterministicLoss": 0.1234,
    "trainLoss": 0.2,
    "convergenceValue": 0.12,
    "wallSeconds": 90.0,
    "earlyStop": {"stopped": True, "reason": "ConvergenceThreshold", "criterion": "dvar", "value": 0.12,
                  "threshold": 0.15, "window": 60, "step": 180, "stepsSaved": 220, "fractionSaved": 0.55},
    "identifier": "<sks>",
}


def test_full_lifecycle_ends_succeeded_with_the_trainers_early_stop_intact(cluster, run_operator):
    saved_before = metrics.STEPS_SAVED.labels(method="textualInversion")._value.get()
    with run_operator():
        created = cluster.create(pj_manifest("concept-a"))
        uid = created["metadata"]["uid"]

        job = wait_for(lambda: cluster.job("concept-a"), what="the Job")
        pj = wait_for(lambda: phase(cluster, "concept-a") == "Pending" and cluster.pj("concept-a"))
        assert pj["status"]["jobName"] == "concept-a"
        assert pj["status"]["observedGeneration"] == 1
        assert condition(pj["status"], "Valid")["status"] == "True"
        # Every child exists once and is owned (controller reference) by the resource.
        owned = {(o["kind"], o["metadata"]["name"]) for o in cluster.owned_by(uid)}
        assert owned == {("ConfigMap", "concept-a-config"), ("ServiceAccount", "concept-a-trainer"),
                         ("Role", "concept-a-trainer"), ("RoleBinding", "concept-a-trainer"), ("Job", "concept-a")}
        pod_spec = job["spec"]["template"]["spec"]
        assert pod_spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert job["spec"]["backoffLimit"] == 2 and "suspend" not in job["spec"]

        # The Job controller starts a pod; the kubelet runs it.
        cluster.start_pod("concept-a")
        cluster.pod_running("concept-a")
        pj = wait_for(lambda: phase(cluster, "concept-a") == "Running" and cluster.pj("concept-a"))
        assert pj["status"]["startTime"]
        assert pj["status"]["attempts"] == 1
        assert condition(pj["status"], "Running")["status"] == "True"

        # The trainer reports progress, then its final decision, then exits 0.
        cluster.trainer_reports("concept-a", {"progress": {"step": 50, "maxSteps": 400, "percent": 12.5},
                                              "deterministicLoss": 0.3})
        cluster.trainer_reports("concept-a", TRAINER_FINAL)
        cluster.job_succeeded("concept-a")

        pj = wait_for(lambda: phase(cluster, "concept-a") == "Succeeded" and cluster.pj("concept-a"))
        status = pj["status"]
        assert condition(pj["status"], "Succeeded")["reason"] == "ConvergenceThreshold"
        assert condition(pj["status"], "Running")["status"] == "False"
        assert status["completionTime"]
        # What the trainer wrote is exactly what is there.
        for key, value in TRAINER_FINAL.items():
            assert status[key] == value, key
        reasons = wait_for(lambda: [e["reason"] for e in cluster.events_for("concept-a")], what="the final event")
        # One Event for the outcome; Pending and Running are told by the Job's and pod's own events.
        assert reasons == ["Succeeded/ConvergenceThreshold"]
        # The jobs-by-phase gauge follows the watch.
        assert wait_for(lambda: metrics.PHASES.counts()["Succeeded"] >= 1)
    assert metrics.STEPS_SAVED.labels(method="textualInversion")._value.get() - saved_before == 220
