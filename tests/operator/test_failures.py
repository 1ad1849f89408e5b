"""Invalid specs, failing Jobs, image pull failures and refused spec changes, end to end."""

from __future__ import annotations

from fake_cluster import PJ, condition, pj_manifest, status_of, wait_for


def test_invalid_spec_is_reported_as_condition_and_warning_without_children(cluster, run_operator):
    with run_operator():
        # Schema-valid, but the window is not below maxSteps and lora options on a TI job.
        bad = pj_manifest("bad", earlyStopping={"window": 500}, lora={"rank": 8})
        cluster.create(bad)
        status = wait_for(lambda: status_of(cluster, "bad").get("phase") == "Failed" and status_of(cluster, "bad"))
        valid = condition(status, "Valid")
        assert valid["status"] == "False" and valid["reason"] == "InvalidSpec"
        assert "spec.earlyStopping.window" in valid["message"] and "spec.lora" in valid["message"]
        assert condition(status, "Failed")["reason"] == "InvalidSpec"
        warnings = wait_for(lambda: [e for e in cluster.events_for("bad") if e["type"] == "Warning"])
        assert warnings[0]["reason"] == "InvalidSpec"
        assert cluster.creations("jobs") == [] and cluster.creations("configmaps") == []

        # Fixing the spec lets it proceed: invalid is the one failure a spec edit can cure.
        cluster.kube.patch(*PJ, "default", "bad", {"spec": {"earlyStopping": {"window": 60}, "lora": None}})
        status = wait_for(lambda: status_of(cluster, "bad").get("phase") == "Pending" and status_of(cluster, "bad"))
        assert condition(status, "Valid")["status"] == "True"
        assert condition(status, "Failed") is None
        assert status["observedGeneration"] == 2
        wait_for(lambda: cluster.job("bad"), what="the Job after the fix")


def test_failing_job_until_retries_are_exhausted(cluster, run_operator):
    with run_operator():
        cluster.create(pj_manifest("flaky", backoffLimit=1))
        wait_for(lambda: cluster.job("flaky"))
        cluster.start_pod("flaky", attempt=0)
        cluster.pod_running("flaky", attempt=0)
        wait_for(lambda: status_of(cluster, "flaky").get("phase") == "Running")
        cluster.pod_failed("flaky", attempt=0)
        cluster.start_pod("flaky", attempt=1)
        status = wait_for(lambda: status_of(cluster, "flaky").get("attempts") == 2 and status_of(cluster, "flaky"))
        assert status["phase"] == "Pending" and condition(status, "Running")["reason"] == "Restarting"
        cluster.pod_failed("flaky", attempt=1)
        cluster.job_failed("flaky", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
        status = wait_for(lambda: status_of(cluster, "flaky").get("phase") == "Failed" and status_of(cluster, "flaky"))
        assert condition(status, "Failed")["reason"] == "BackoffLimitExceeded"
        assert status["attempts"] == 2
        assert status["completionTime"]
        assert wait_for(lambda: [e for e in cluster.events_for("flaky") if e["reason"] == "Failed/BackoffLimitExceeded"])


def test_oom_killed_pod_names_the_reason(cluster, run_operator):
    with run_operator():
        cluster.create(pj_manifest("hungry", backoffLimit=0))
        wait_for(lambda: cluster.job("hungry"))
        cluster.start_pod("hungry")
        cluster.pod_failed("hungry", reason="OOMKilled", exit_code=137)
        cluster.job_failed("hungry", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
        status = wait_for(lambda: status_of(cluster, "hungry").get("phase") == "Failed" and status_of(cluster, "hungry"))
        assert condition(status, "Failed")["reason"] == "OOMKilled"


def test_deadline_exceeded(cluster, run_operator):
    with run_operator():
        cluster.create(pj_manifest("slow"))
        wait_for(lambda: cluster.job("slow"))
        cluster.start_pod("slow")
        cluster.pod_running("slow")
        cluster.job_failed("slow", "DeadlineExceeded", "Job was active longer than specified deadline")
        status = wait_for(lambda: status_of(cluster, "slow").get("phase") == "Failed" and status_of(cluster, "slow"))
        assert condition(status, "Failed")["reason"] == "DeadlineExceeded"


def test_image_pull_backoff_fails_the_job_and_frees_the_node(cluster, run_operator):
    with run_operator(PJ_IMAGE_PULL_GRACE_SECONDS="0", PJ_ALLOWED_IMAGE_PREFIXES="*"):
        cluster.create(pj_manifest("typo", image="registry.invalid/trainer:nope"))
        wait_for(lambda: cluster.job("typo"))
        cluster.start_pod("typo")
        cluster.pod_image_pull_backoff("typo")
        status = wait_for(lambda: status_of(cluster, "typo").get("phase") == "Failed" and status_of(cluster, "typo"))
        assert condition(status, "Failed")["reason"] == "ImagePullBackOff"
        # The Job is deleted so its pod stops holding a GPU; the record stays in the status.
        wait_for(lambda: cluster.job("typo") is None, what="the Job's deletion")
        assert status["jobName"] == "typo"


def test_spec_change_after_start_is_refused(cluster, run_operator):
    with run_operator():
        cluster.create(pj_manifest("fixed"))
        job = wait_for(lambda: cluster.job("fixed"))
        cluster.kube.patch(*PJ, "default", "fixed", {"spec": {"training": {"maxSteps": 900}}})
        status = wait_for(lambda: condition(status_of(cluster, "fixed"), "SpecChangeRefused") and status_of(cluster, "fixed"))
        refused = condition(status, "SpecChangeRefused")
        assert refused["status"] == "True" and "spec.training.maxSteps" in refused["message"]
        assert status["observedGeneration"] == 2
        assert wait_for(lambda: [e for e in cluster.events_for("fixed") if e["reason"] == "SpecChangeRefused"])
        # The Job and its config are untouched.
        assert cluster.job("fixed")["spec"] == job["spec"]
        config = cluster.get("v1", "ConfigMap", "default", "fixed-config")["data"]["job.yaml"]
        assert "maxSteps: 400" in config
        assert len(cluster.creations("jobs")) == 1

        # Changing it back to what the Job runs clears the refusal (no new Warning, no new Job).
        warnings = len([e for e in cluster.events_for("fixed") if e["reason"] == "SpecChangeRefused"])
        cluster.kube.patch(*PJ, "default", "fixed", {"spec": {"training": {"maxSteps": 400}}})
        status = wait_for(lambda: condition(status_of(cluster, "fixed"), "SpecChangeRefused")["status"] == "False"
                          and status_of(cluster, "fixed"))
        cleared = condition(status, "SpecChangeRefused")
        assert cleared["reason"] == "SpecMatchesJob" and status["observedGeneration"] == 3
        assert len([e for e in cluster.events_for("fixed") if e["reason"] == "SpecChangeRefused"]) == warnings
        assert len(cluster.creations("jobs")) == 1


def test_refused_job_creation_is_reported_and_retried(cluster, run_operator):
    cluster.server.refusals["jobs"] = [(403, 'jobs "quota" is forbidden: exceeded quota: gpu-quota')]
    with run_operator():
        cluster.create(pj_manifest("squeezed"))
        warning = wait_for(lambda: [e for e in cluster.events_for("squeezed") if e["reason"] == "ChildCreationFailed"])
        assert "exceeded quota" in warning[0]["message"]
        # kopf retries; the quota has room now.
        wait_for(lambda: cluster.job("squeezed"), what="the Job on retry")
        assert len(cluster.owned_by(cluster.pj("squeezed")["metadata"]["uid"])) == 5


def test_job_deleted_by_hand_while_running_is_job_lost(cluster, run_operator):
    with run_operator():
        cluster.create(pj_manifest("orphan"))
        wait_for(lambda: cluster.job("orphan"))
        cluster.start_pod("orphan")
        cluster.pod_running("orphan")
        cluster.trainer_reports("orphan", {"progress": {"step": 10, "maxSteps": 400, "percent": 2.5}})
        wait_for(lambda: status_of(cluster, "orphan").get("phase") == "Running")
        cluster.delete("batch/v1", "Job", "default", "orphan")
        status = wait_for(lambda: status_of(cluster, "orphan").get("phase") == "Failed" and status_of(cluster, "orphan"))
        assert condition(status, "Failed")["reason"] == "JobLost"
        assert status["progress"]["step"] == 10
        # Never re-run: a lost job is not re-created.
        assert len(cluster.creations("jobs")) == 1


def test_a_foreign_object_with_a_childs_name_is_never_taken_over(cluster, run_operator):
    cluster.create({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "clash-config", "namespace": "default"}, "data": {"job.yaml": "mine"}})
    with run_operator():
        cluster.create(pj_manifest("clash"))
        cond = wait_for(lambda: condition(status_of(cluster, "clash"), "Running") and
                        condition(status_of(cluster, "clash"), "Running")["reason"] == "NameConflict"
                        and condition(status_of(cluster, "clash"), "Running"))
        assert "ConfigMap clash-config" in cond["message"]
        assert cluster.get("v1", "ConfigMap", "default", "clash-config")["data"] == {"job.yaml": "mine"}
        assert cluster.creations("jobs") == []
