"""Pure logic: lifecycle mapping, condition bookkeeping, queue order, validation, settings."""

from __future__ import annotations

import datetime

import pytest

from fake_cluster import pj_manifest
from pj_operator import capacity, lifecycle
from pj_operator.settings import Settings
from pj_operator.validation import validate_job


def job(status=None, suspend=False, labels=None):
    return {"metadata": {"name": "j", "labels": labels or {}}, "spec": {"suspend": suspend}, "status": status or {}}


def failed_cond(reason):
    return {"type": "Failed", "status": "True", "reason": reason, "message": "m", "lastTransitionTime": "t"}


@pytest.mark.parametrize("status,pods,phase,reason", [
    ({}, [], "Pending", "JobCreated"),
    ({"active": 1}, [], "Pending", "JobCreated"),
    ({"active": 1, "ready": 1, "startTime": "s"}, [], "Running", "PodRunning"),
    ({"active": 1, "failed": 1}, [], "Pending", "Restarting"),
    ({"failed": 3, "conditions": [failed_cond("BackoffLimitExceeded")]}, [], "Failed", "BackoffLimitExceeded"),
    ({"conditions": [failed_cond("DeadlineExceeded")]}, [], "Failed", "DeadlineExceeded"),
    ({"failed": 1, "conditions": [failed_cond("BackoffLimitExceeded")]},
     [{"metadata": {"name": "p", "creationTimestamp": "1"}, "status": {"phase": "Failed", "containerStatuses": [
         {"state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}]}}], "Failed", "OOMKilled"),
    # Without start limits (the Job watch, which lists no pods) a stuck pod is not judged.
    ({"active": 1}, [{"metadata": {"name": "p"}, "status": {"containerStatuses": [
        {"state": {"waiting": {"reason": "ImagePullBackOff"}}}]}}], "Pending", "JobCreated"),
])
def test_job_state_maps_to_phase_and_reason(status, pods, phase, reason):
    obs = lifecycle.observe_job(job(status), pods, {})
    assert (obs.phase, obs.reason) == (phase, reason)
    assert not obs.delete_job


T0 = "2026-01-01T00:00:00Z"
LIMITS = lifecycle.StartLimits(image_pull_grace=300, start_failure_grace=60, pending_deadline=3600)


def at(seconds):
    return lifecycle.parse_time(T0) + datetime.timedelta(seconds=seconds)


def waiting_pod(reason, message="m", created=T0):
    return {"metadata": {"name": "p", "creationTimestamp": created}, "status": {"phase": "Pending", "containerStatuses": [
        {"name": "trainer", "state": {"waiting": {"reason": reason, "message": message}}}]}}


def warning(kind, name, reason, message, first=T0):
    return {"type": "Warning", "reason": reason, "message": message, "firstTimestamp": first, "lastTimestamp": first,
            "involvedObject": {"kind": kind, "name": name}}


def pending_job(active=1):
    return {"metadata": {"name": "j", "creationTimestamp": T0}, "spec": {}, "status": {"active": active}}


@pytest.mark.parametrize("reason,grace", [("ImagePullBackOff", 300), ("ErrImagePull", 300),
                                          ("InvalidImageName", 0), ("ErrImageNeverPull", 0),
                                          ("CreateContainerConfigError", 60), ("CreateContainerError", 60)])
def test_a_stuck_container_fails_only_after_its_grace_period(reason, grace):
    pods = [waiting_pod(reason, "why")]
    if grace:
        assert lifecycle.start_failure(pending_job(), pods, [], LIMITS, now=at(grace - 1)) is None
    failed_reason, message = lifecycle.start_failure(pending_job(), pods, [], LIMITS, now=at(grace))
    assert failed_reason == ("ImagePullBackOff" if "Image" in reason else reason)
    assert message == f"pod p: {reason}: why"
    obs = lifecycle.observe_job(pending_job(), pods, {}, [], LIMITS, now=at(grace))
    assert (obs.phase, obs.reason, obs.delete_job) == ("Failed", failed_reason, True)


def test_failed_create_counts_only_while_no_pod_exists():
    events = [warning("Job", "j", "FailedCreate", "exceeded quota: gpu")]
    assert lifecycle.start_failure(pending_job(active=0), [], events, LIMITS, now=at(59)) is None
    assert lifecycle.start_failure(pending_job(active=0), [], events, LIMITS, now=at(60)) == (
        "FailedCreate", "Job j: FailedCreate: exceeded quota: gpu")
    # The quota had room later: a pod exists, an old refusal no longer fails the job.
    assert lifecycle.start_failure(pending_job(), [waiting_pod("ContainerCreating")], events, LIMITS,
                                   now=at(61)) is None


def test_volume_events_on_the_pod_fail_it_and_the_pending_deadline_names_the_last_word():
    multi = warning("Pod", "p", "FailedAttachVolume", "Multi-Attach error for volume pvc-1")
    pod = {"metadata": {"name": "p", "creationTimestamp": T0}, "status": {"phase": "Pending"}}
    assert lifecycle.start_failure(pending_job(), [pod], [multi], LIMITS, now=at(60))[0] == "FailedAttachVolume"
    unschedulable = warning("Pod", "p", "FailedScheduling", "0/3 nodes are available")
    assert lifecycle.start_failure(pending_job(), [pod], [unschedulable], LIMITS, now=at(3599)) is None
    reason, message = lifecycle.start_failure(pending_job(), [pod], [unschedulable], LIMITS, now=at(3600))
    assert reason == "PendingDeadlineExceeded" and "FailedScheduling: 0/3 nodes are available" in message
    no_deadline = lifecycle.StartLimits(pending_deadline=0)
    assert lifecycle.start_failure(pending_job(), [pod], [unschedulable], no_deadline, now=at(10**6)) is None


def test_running_suspended_or_finished_jobs_are_never_start_failures():
    pods = [waiting_pod("InvalidImageName")]
    running = dict(pending_job(), status={"active": 1, "ready": 1})
    suspended = dict(pending_job(), spec={"suspend": True})
    finished = dict(pending_job(), status={"conditions": [failed_cond("BackoffLimitExceeded")]})
    for job_ in (running, suspended, finished):
        assert lifecycle.start_failure(job_, pods, [], LIMITS, now=at(10**6)) is None


def test_only_the_last_failed_pod_decides_oom():
    pods = [
        {"metadata": {"name": "p0", "creationTimestamp": "2026-01-01T00:00:00Z"}, "status": {"phase": "Failed",
         "containerStatuses": [{"state": {"terminated": {"reason": "OOMKilled"}}}]}},
        {"metadata": {"name": "p1", "creationTimestamp": "2026-01-01T00:01:00Z"}, "status": {"phase": "Failed",
         "containerStatuses": [{"state": {"terminated": {"reason": "Error"}}}]}},
    ]
    assert lifecycle.oom_killed(pods) is None
    assert lifecycle.oom_killed(pods[:1])


@pytest.mark.parametrize("early,reason", [
    ({"reason": "ConvergenceThreshold", "stepsSaved": 10}, "ConvergenceThreshold"),
    ({"reason": "MaxSteps"}, "MaxSteps"),
    (None, "Completed"),
])
def test_success_reason_comes_from_the_trainer(early, reason):
    complete = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    obs = lifecycle.observe_job(job(complete), [], {"earlyStop": early} if early else {})
    assert (obs.phase, obs.reason) == ("Succeeded", reason)


def test_kueue_suspended_job_is_queued():
    obs = lifecycle.observe_job(job(suspend=True, labels={"kueue.x-k8s.io/queue-name": "q"}), [], {})
    assert (obs.phase, obs.reason) == ("Queued", "WaitingForKueue")


def test_a_vanished_job_ends_by_the_trainers_report():
    assert lifecycle.observe_job(None, [], {"earlyStop": {"reason": "MaxSteps"}}).phase == "Succeeded"
    assert lifecycle.observe_job(None, [], {"progress": {"step": 3}}).reason == "JobLost"


def test_patch_names_only_operator_fields_and_keeps_transition_times():
    status = {"phase": "Running", "progress": {"step": 5}, "earlyStop": {"stopped": False},
              "conditions": [{"type": "Running", "status": "True", "reason": "PodRunning", "message": "m",
                              "lastTransitionTime": "T0"}]}
    same = lifecycle.Observation("Running", "PodRunning", "m", attempts=None)
    assert lifecycle.lifecycle_patch(status, same, now="T1") is None
    done = lifecycle.Observation("Succeeded", "ConvergenceThreshold", "done", completion_time="T2", attempts=1)
    patch = lifecycle.lifecycle_patch(status, done, now="T3")
    assert set(patch) == {"phase", "conditions", "completionTime", "attempts"}
    conds = {c["type"]: c for c in patch["conditions"]}
    assert conds["Running"]["status"] == "False" and conds["Running"]["lastTransitionTime"] == "T3"
    assert conds["Succeeded"]["reason"] == "ConvergenceThreshold"
    # A message change without a status flip keeps the transition time.
    again = lifecycle.set_condition(patch["conditions"], "Succeeded", "True", "ConvergenceThreshold", "other", "T9")
    assert next(c for c in again if c["type"] == "Succeeded")["lastTransitionTime"] == "T3"


def pj(name, created, phase=None, priority_class=None, queue=None, job_name=None):
    spec = {"resources": {"priorityClassName": priority_class} if priority_class else {}}
    if queue:
        spec["queueName"] = queue
    status = {"phase": phase} if phase else {}
    if job_name:
        status["jobName"] = job_name
    return {"metadata": {"name": name, "namespace": "ns", "uid": name, "creationTimestamp": created},
            "spec": spec, "status": status}


def test_queue_order_priority_then_age_and_cap():
    everyone = [
        pj("running", "t0", "Running", job_name="running"),
        pj("kueue", "t0", "Queued", queue="q", job_name="kueue"),
        pj("old", "t1", "Queued"),
        pj("young-urgent", "t3", "Queued", priority_class="urgent"),
        pj("young", "t2", "Queued"),
    ]
    prio = {"urgent": 100}
    assert capacity.decide(everyone[3], everyone, 2, prio).admit  # one free slot, it is first
    old = capacity.decide(everyone[2], everyone, 2, prio)
    assert (old.admit, old.position, old.waiting, old.running) == (False, 2, 3, 1)
    assert capacity.decide(everyone[4], everyone, 2, prio).position == 3
    # Kueue jobs neither hold slots nor queue here.
    assert not capacity.holds_slot(everyone[1]) and not capacity.is_waiting(everyone[1])


def test_priority_class_values_and_global_default():
    values, default = capacity.priority_values([
        {"metadata": {"name": "a"}, "value": 5}, {"metadata": {"name": "b"}, "value": 7, "globalDefault": True}])
    assert values == {"a": 5, "b": 7} and default == 7


@pytest.mark.parametrize("overrides,needle", [
    ({"resources": {"nodeSelector": {"bad key!": "x"}}}, "nodeSelector"),
    ({"resources": {"tolerations": [{"operator": "Exists", "value": "x"}]}}, "value must be empty"),
    ({"training": {"maxSteps": 50, "minSteps": 10}, "earlyStopping": {"window": 60}}, "earlyStopping.window"),
    ({"dreambooth": {"trainTextEncoder": True}}, "spec.dreambooth"),
    ({"method": "bogus"}, "spec.method"),
    ({"output": {"claimName": "Not_A_Name", "path": "x"}}, "spec.output.claimName"),
])
def test_validation_beyond_the_schema(overrides, needle):
    checked = validate_job(pj_manifest("x", **overrides), Settings())
    assert not checked.ok
    assert any(needle in p for p in checked.problems), checked.problems


def test_an_evaluation_spacing_beyond_the_window_is_refused_only_when_given():
    given = validate_job(pj_manifest("x", earlyStopping={"window": 3, "evalEvery": 5}), Settings())
    assert any("spec.earlyStopping.evalEvery: 5" in p for p in given.problems)
    # the default evalEvery (4) is larger than this window; the user did not choose it
    assert validate_job(pj_manifest("x", earlyStopping={"window": 3}), Settings()).ok


def test_names_must_fit_in_labels():
    checked = validate_job(pj_manifest("x" * 64), Settings())
    assert any("metadata.name" in p for p in checked.problems)
    assert validate_job(pj_manifest("x" * 63), Settings()).ok


def test_settings_from_env():
    s = Settings.from_env({"PJ_MAX_CONCURRENT_JOBS": "3", "PJ_NAMESPACES": "a, b", "PJ_KUEUE_ENABLED": "false",
                           "PJ_TRAINER_IMAGE": "img"})
    assert (s.max_concurrent_jobs, s.namespaces, s.kueue_enabled, s.trainer_image) == (3, ("a", "b"), False, "img")
    with pytest.raises(ValueError):
        Settings.from_env({"PJ_MAX_CONCURRENT_JOBS": "-1"})
    with pytest.raises(ValueError):
        Settings.from_env({"PJ_KUEUE_ENABLED": "maybe"})
    s = Settings.from_env({"PJ_API_RETRIES": "2", "PJ_API_BACKOFF": "0.1", "PJ_TERMINATION_GRACE_PERIOD_SECONDS": "300"})
    assert (s.api_retries, s.api_backoff, s.termination_grace_period_seconds) == (2, 0.1, 300)
    assert Settings().termination_grace_period_seconds == 120
    assert Settings().trainer_metrics_linger_seconds == 30.0  # about one scrape interval
    assert Settings.from_env({"PJ_TRAINER_METRICS_LINGER_SECONDS": "0"}).trainer_metrics_linger_seconds == 0
    for bad in ({"PJ_TRAINER_METRICS_LINGER_SECONDS": "-1"},
                # the linger also runs after SIGTERM: it must leave the grace period room for the checkpoint
                {"PJ_TRAINER_METRICS_LINGER_SECONDS": "120"},
                {"PJ_TERMINATION_GRACE_PERIOD_SECONDS": "20"}):
        with pytest.raises(ValueError, match="PJ_TRAINER_METRICS_LINGER_SECONDS"):
            Settings.from_env(bad)
    with pytest.raises(ValueError):
        Settings.from_env({"PJ_API_RETRIES": "-1"})
