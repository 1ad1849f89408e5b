"""Preemption support in the Job (podFailurePolicy) and recovering the trainer's decision from
its pod's termination message when its final status patch never arrived."""

from __future__ import annotations

import json

import pytest

from fake_apiserver import K8S_VERSIONS, validate_builtin
from fake_cluster import condition, pj_manifest, pod_failure_action, status_of, wait_for
from pj_operator import children, lifecycle, metrics
from pj_operator.settings import Settings
from pj_operator.validation import validate_job
from personalize.spec import TrainerReport

REPORT = {
    "progress": {"step": 180, "maxSteps": 400, "percent": 45.0},
    "deterministicLoss": 0.1234,
    "earlyStop": {"stopped": True, "reason": "ConvergenceThreshold", "criterion": "dvar", "value": 0.12,
                  "threshold": 0.15, "window": 60, "step": 180, "stepsSaved": 220, "fractionSaved": 0.55},
    "identifier": "<sks>",
    "artifact": {"location": "/output/runs/x", "files": ["learned_embeds.safetensors"], "snapshots": []},
    "wallSeconds": 90.0,
}


def build_job(settings=Settings(), **overrides):
    checked = validate_job(pj_manifest("cat", "team-a", **overrides), settings)
    assert checked.ok, checked.problems
    return children.job(checked.job, "cat", "team-a", settings)


def compact(report):
    return json.dumps(report, separators=(",", ":"))


# ---- the Job manifest ----------------------------------------------------------------------------


def test_job_has_the_preemption_policy_and_is_valid_for_old_and_new_kubernetes():
    job = build_job()
    spec = job["spec"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # required by podFailurePolicy
    assert spec["podReplacementPolicy"] == "Failed"
    assert pod["terminationGracePeriodSeconds"] == 120
    rules = spec["podFailurePolicy"]["rules"]
    assert [r["action"] for r in rules] == ["Ignore", "FailJob", "FailJob", "Count"]
    assert rules[0]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    assert rules[1]["onExitCodes"] == {"containerName": "trainer", "operator": "In", "values": [2]}
    assert rules[2]["onExitCodes"]["values"] == [3]  # finished, but the final status patch failed
    assert rules[3]["onExitCodes"]["values"] == [143]
    container = pod["containers"][0]
    assert container["terminationMessagePath"] == "/dev/termination-log"
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert K8S_VERSIONS == ("1.28.0", "1.37.0")
    validate_builtin(job)  # both versions


def test_grace_period_is_an_operator_setting():
    settings = Settings.from_env({"PJ_TERMINATION_GRACE_PERIOD_SECONDS": "600"})
    assert build_job(settings)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 600


def test_a_rule_without_on_pod_conditions_is_refused_by_the_1_28_schema():
    """Why every exit-code rule carries `onPodConditions: []`: the fixture must catch this."""
    job = build_job()
    del job["spec"]["podFailurePolicy"]["rules"][1]["onPodConditions"]
    with pytest.raises(Exception, match="1.28"):
        validate_builtin(job)


@pytest.mark.parametrize("exit_code,disrupted,action", [
    (143, True, "Ignore"),   # preempted: the checkpointed SIGTERM exit does not count
    (1, True, "Ignore"),     # preempted, whatever the exit code
    (2, False, "FailJob"),   # bad input: never retried
    (143, False, "Count"),   # SIGTERM for another reason: a counted retry
    (1, False, "Count"),     # a crash: default
    (137, False, "Count"),   # OOM / SIGKILL
])
def test_the_fake_job_controller_reads_the_policy_like_kubernetes(exit_code, disrupted, action):
    pod = {"status": {"containerStatuses": [{"name": "trainer",
                                             "state": {"terminated": {"exitCode": exit_code}}}]}}
    if disrupted:
        pod["status"]["conditions"] = [{"type": "DisruptionTarget", "status": "True"}]
    assert pod_failure_action(build_job(), pod)[0] == action


# ---- end to end ----------------------------------------------------------------------------------


def test_preemption_does_not_use_up_the_backoff_limit(cluster, run_operator):
    with run_operator():
        cluster.create(pj_manifest("preempted", backoffLimit=0))
        wait_for(lambda: cluster.job("preempted"))
        cluster.start_pod("preempted", attempt=0)
        cluster.pod_running("preempted", attempt=0)
        wait_for(lambda: status_of(cluster, "preempted").get("phase") == "Running")
        assert cluster.pod_preempted("preempted", attempt=0) == "Ignore"
        # backoffLimit 0, yet the Job goes on: the controller starts a replacement.
        assert not [c for c in cluster.job("preempted")["status"].get("conditions") or [] if c["type"] == "Failed"]
        cluster.start_pod("preempted", attempt=1)
        cluster.pod_running("preempted", attempt=1)
        cluster.trainer_reports("preempted", {"earlyStop": REPORT["earlyStop"]})
        cluster.job_succeeded("preempted", attempt=1)
        status = wait_for(lambda: status_of(cluster, "preempted").get("phase") == "Succeeded"
                          and status_of(cluster, "preempted"))
        assert condition(status, "Succeeded")["reason"] == "ConvergenceThreshold"


def test_sigterm_without_preemption_is_a_counted_retry(cluster, run_operator):
    with run_operator():
        cluster.create(pj_manifest("terminated", backoffLimit=0))
        wait_for(lambda: cluster.job("terminated"))
        cluster.start_pod("terminated")
        assert cluster.pod_failed("terminated", exit_code=143) == "Count"
        status = wait_for(lambda: status_of(cluster, "terminated").get("phase") == "Failed"
                          and status_of(cluster, "terminated"))
        assert condition(status, "Failed")["reason"] == "BackoffLimitExceeded"


def test_bad_input_fails_at_once_without_retries(cluster, run_operator):
    failing_before = metrics.COMPLETIONS.labels(reason="BadInput")._value.get()
    with run_operator():
        cluster.create(pj_manifest("garbage", backoffLimit=3))
        wait_for(lambda: cluster.job("garbage"))
        cluster.start_pod("garbage")
        log_tail = ("loading concept images\n"
                    "error: spec.concept.images: 2 images found in /mnt/concept-images/concept, need at least 4\n")
        assert cluster.pod_failed("garbage", exit_code=2, message=log_tail) == "FailJob"
        status = wait_for(lambda: status_of(cluster, "garbage").get("phase") == "Failed"
                          and status_of(cluster, "garbage"))
        failed = condition(status, "Failed")
        assert failed["reason"] == "BadInput"
        assert failed["message"] == ("Job garbage: the trainer rejected its input (exit code 2, not retried): "
                                     "error: spec.concept.images: 2 images found in "
                                     "/mnt/concept-images/concept, need at least 4")
        assert status["attempts"] == 1
        assert wait_for(lambda: [e for e in cluster.events_for("garbage") if e["reason"] == "Failed/BadInput"])
    assert metrics.COMPLETIONS.labels(reason="BadInput")._value.get() == failing_before + 1


def test_missing_final_status_is_recovered_from_the_termination_message(cluster, run_operator):
    saved_before = metrics.STEPS_SAVED.labels(method="textualInversion")._value.get()
    with run_operator():
        cluster.create(pj_manifest("mute"))
        wait_for(lambda: cluster.job("mute"))
        cluster.start_pod("mute")
        cluster.pod_running("mute")
        # Progress arrived; the final patch did not (API server unreachable at the very end).
        cluster.trainer_reports("mute", {"progress": {"step": 150, "maxSteps": 400, "percent": 37.5}})
        cluster.job_succeeded("mute", termination_message=compact(REPORT))
        status = wait_for(lambda: status_of(cluster, "mute").get("phase") == "Succeeded" and status_of(cluster, "mute"))
        succeeded = condition(status, "Succeeded")
        assert succeeded["reason"] == "ConvergenceThreshold"
        assert "recovered from the trainer pod's termination message" in succeeded["message"]
        assert status["earlyStop"] == REPORT["earlyStop"]
        assert status["identifier"] == "<sks>" and status["artifact"] == REPORT["artifact"]
        # What the trainer did write stays; only missing fields are filled in.
        assert status["progress"]["step"] == 150
        assert wait_for(lambda: [e for e in cluster.events_for("mute") if e["reason"] == "DecisionRecovered"])
    assert metrics.STEPS_SAVED.labels(method="textualInversion")._value.get() - saved_before == 220


def test_recovery_from_the_compact_subset_and_from_max_steps(cluster, run_operator):
    subset = {"earlyStop": {"stopped": False, "reason": "MaxSteps", "step": 400, "stepsSaved": 0},
              "progress": {"step": 400, "maxSteps": 400, "percent": 100.0}, "identifier": "<sks>",
              "artifact": {"location": "s3://bucket/runs/y"}}
    with run_operator():
        cluster.create(pj_manifest("subset"))
        wait_for(lambda: cluster.job("subset"))
        cluster.start_pod("subset")
        cluster.job_succeeded("subset", termination_message=compact(subset))
        status = wait_for(lambda: status_of(cluster, "subset").get("phase") == "Succeeded"
                          and status_of(cluster, "subset"))
        assert condition(status, "Succeeded")["reason"] == "MaxSteps"
        assert status["earlyStop"]["reason"] == "MaxSteps"


def test_a_log_tail_instead_of_a_report_is_not_a_decision(cluster, run_operator):
    with run_operator():
        cluster.create(pj_manifest("chatty"))
        wait_for(lambda: cluster.job("chatty"))
        cluster.start_pod("chatty")
        cluster.job_succeeded("chatty", termination_message="step 400 done\nbye\n")
        status = wait_for(lambda: status_of(cluster, "chatty").get("phase") == "Succeeded"
                          and status_of(cluster, "chatty"))
        assert condition(status, "Succeeded")["reason"] == "Completed"
        assert "earlyStop" not in status


def test_the_trainers_own_status_wins_over_the_termination_message():
    written = {"earlyStop": {"stopped": False, "reason": "MaxSteps", "step": 400}}
    other = dict(REPORT)
    job = {"metadata": {"name": "j"}, "spec": {},
           "status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}}
    pod = {"metadata": {"name": "j-0"}, "status": {"phase": "Succeeded", "containerStatuses": [
        {"name": "trainer", "state": {"terminated": {"exitCode": 0, "message": compact(other)}}}]}}
    obs = lifecycle.observe_job(job, [pod], written)
    assert (obs.reason, obs.recovered) == ("MaxSteps", {})
    # Without the trainer's decision the message decides, and only missing fields are recovered.
    obs = lifecycle.observe_job(job, [pod], {"progress": {"step": 1}})
    assert obs.reason == "ConvergenceThreshold" and "progress" not in obs.recovered
    assert obs.recovered["earlyStop"] == REPORT["earlyStop"]


def test_a_full_report_fits_the_termination_message_limit():
    """The trainer writes result.json compacted; a realistic report stays under 4096 bytes, and the
    documented fallback subset is itself a valid report."""
    full = dict(REPORT, reference={"size": 8, "subBatches": 1, "indices": list(range(8)), "holdout": False,
                                   "fixed": "11111", "evalEvery": 10},
                stages=[{"name": "textualInversion", "steps": 180}], trainLoss=0.2, convergenceValue=0.12)
    assert len(compact(TrainerReport.model_validate(full).to_api()).encode()) < 4096
    subset = {k: REPORT[k] for k in ("earlyStop", "progress", "identifier", "artifact")}
    pod = {"metadata": {"name": "p"}, "status": {"phase": "Succeeded", "containerStatuses": [
        {"name": "trainer", "state": {"terminated": {"exitCode": 0, "message": compact(subset)}}}]}}
    assert lifecycle.termination_report([pod]) == subset
