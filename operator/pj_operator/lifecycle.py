"""From the child Job (and its pods) to the PersonalizationJob's phase and conditions. Pure.

`observe_job` reads what Kubernetes reports; `lifecycle_patch` turns an observation into a merge
patch of the operator-owned status fields. The patch never names a field the trainer writes
(progress, deterministicLoss, earlyStop, ...): merge patches leave unnamed keys untouched. The
one exception is decision recovery: when the Job completed and status lacks the trainer's
earlyStop, the fields the trainer wrote to its termination message fill in what status lacks.
"""

from __future__ import annotations

import datetime
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import ValidationError

from personalize.spec import Phase, StopReason, TrainerReport

from .names import EXIT_BAD_INPUT, TRAINER_CONTAINER

logger = logging.getLogger(__name__)

TERMINAL = (Phase.succeeded.value, Phase.failed.value)

# Condition types the operator maintains (docs/operator.md).
VALID = "Valid"
QUEUED = "Queued"
RUNNING = "Running"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
SPEC_CHANGE_REFUSED = "SpecChangeRefused"

# Failed reasons.
INVALID_SPEC = "InvalidSpec"
IMAGE_PULL = "ImagePullBackOff"
OOM_KILLED = "OOMKilled"
DEADLINE = "DeadlineExceeded"
BACKOFF_LIMIT = "BackoffLimitExceeded"
JOB_LOST = "JobLost"
BAD_INPUT = "BadInput"  # the trainer exited 2: podFailurePolicy failed the Job without retries
POD_FAILURE_POLICY = "PodFailurePolicy"  # the Job's own reason for a FailJob rule
# Pending reasons.
JOB_CREATED = "JobCreated"
# Succeeded reasons.
EARLY_STOPPED = "EarlyStopped"
MAX_STEPS = "MaxSteps"
COMPLETED = "Completed"

SUCCESS_REASONS = (EARLY_STOPPED, MAX_STEPS, COMPLETED)
# Every failure reason the operator itself decides. A Job may also fail for a reason of its own
# (its Failed condition's reason, e.g. PodFailurePolicy, MaxFailedIndexesExceeded), passed through.
FAILURE_REASONS = (INVALID_SPEC, IMAGE_PULL, OOM_KILLED, DEADLINE, BACKOFF_LIMIT, JOB_LOST, BAD_INPUT,
                   POD_FAILURE_POLICY)


# Kubelet waiting reasons that will not fix themselves: the pod would hold its GPU forever.
_IMAGE_FAILURES = ("ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")


def job_created_message(job_name: str) -> str:
    return f"Job {job_name} created; waiting for its pod"


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Observation:
    phase: str
    reason: str
    message: str
    start_time: Optional[str] = None
    completion_time: Optional[str] = None
    attempts: Optional[int] = None
    # The Job should be deleted (its pod can never start and would keep its node's GPU).
    delete_job: bool = False
    # Trainer fields recovered from the pod's termination message, to write into status (only
    # those the status lacks): the trainer's own final status patch never arrived.
    recovered: dict[str, Any] = field(default_factory=dict)


def _job_condition(job: dict, kind: str) -> Optional[dict]:
    for cond in job.get("status", {}).get("conditions") or []:
        if cond.get("type") == kind and cond.get("status") == "True":
            return cond
    return None


def _container_statuses(pod: dict) -> list[dict]:
    status = pod.get("status", {})
    return (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])


def image_pull_failure(pods: list[dict]) -> Optional[str]:
    """A message if some pod is stuck pulling its image, else None."""
    for pod in pods:
        for cs in _container_statuses(pod):
            waiting = cs.get("state", {}).get("waiting") or {}
            if waiting.get("reason") in _IMAGE_FAILURES:
                return f"pod {pod['metadata']['name']}: {waiting['reason']}: {waiting.get('message', cs.get('image', ''))}"
    return None


def oom_killed(pods: list[dict]) -> Optional[str]:
    """A message if the most recently failed pod was killed for exceeding its memory."""
    failed = [p for p in pods if p.get("status", {}).get("phase") == "Failed"]
    failed.sort(key=lambda p: p.get("metadata", {}).get("creationTimestamp", ""))
    for pod in reversed(failed):
        for cs in _container_statuses(pod):
            terminated = cs.get("state", {}).get("terminated") or {}
            if terminated.get("reason") == "OOMKilled":
                return f"pod {pod['metadata']['name']} was OOMKilled (exit code {terminated.get('exitCode')})"
        return None
    return None


def _trainer_terminations(pods: list[dict], phase: str) -> list[dict]:
    """`state.terminated` of the trainer container in pods of `phase`, newest pod first."""
    chosen = [p for p in pods if p.get("status", {}).get("phase") == phase]
    chosen.sort(key=lambda p: p.get("metadata", {}).get("creationTimestamp", ""), reverse=True)
    out = []
    for pod in chosen:
        for cs in pod.get("status", {}).get("containerStatuses") or []:
            terminated = (cs.get("state") or {}).get("terminated")
            if cs.get("name") == TRAINER_CONTAINER and terminated:
                out.append(terminated)
    return out


def termination_report(pods: list[dict]) -> Optional[dict[str, Any]]:
    """The trainer's final report from its succeeded pod's termination message, or None.

    The trainer writes its result.json (compact JSON; under 4096 bytes, else the subset
    earlyStop/progress/identifier/artifact) to /dev/termination-log; the kubelet copies it into
    the container status. Anything that is not a valid TrainerReport is ignored."""
    for terminated in _trainer_terminations(pods, "Succeeded"):
        text = terminated.get("message") or ""
        try:
            report = TrainerReport.model_validate(json.loads(text)).to_api()
        except (ValueError, ValidationError) as err:  # JSONDecodeError is a ValueError
            logger.warning("termination message of the trainer is not a report (%s)", type(err).__name__)
            continue
        return {k: v for k, v in report.items() if v not in (None, [], {})}
    return None


def bad_input_message(pods: list[dict]) -> Optional[str]:
    """If the most recent failed trainer exited 2 (bad input): its last message line."""
    for terminated in _trainer_terminations(pods, "Failed")[:1]:
        if terminated.get("exitCode") == EXIT_BAD_INPUT:
            lines = [line.strip() for line in (terminated.get("message") or "").splitlines() if line.strip()]
            return lines[-1][:512] if lines else "(no message)"
    return None


def succeeded_reason(status: dict) -> tuple[str, str]:
    """Why a completed job stopped, from the trainer's own report (status.earlyStop)."""
    early = status.get("earlyStop") or {}
    reason = early.get("reason")
    if reason == StopReason.convergence_threshold.value:
        saved = early.get("stepsSaved")
        return EARLY_STOPPED, (
            f"converged at step {early.get('step')} ({early.get('criterion')} value {early.get('value')} "
            f"< threshold {early.get('threshold')}); {saved} steps saved"
        )
    if reason == StopReason.max_steps.value:
        return MAX_STEPS, f"ran all {early.get('step')} steps without converging"
    return COMPLETED, "the trainer finished without reporting an early-stopping decision"


def observe_job(job: Optional[dict], pods: list[dict], status: dict) -> Observation:
    """What phase the resource is in, given its Job (None: the Job is gone) and the Job's pods."""
    if job is None:
        # The Job vanished before we saw it finish (TTL while the operator was down, or deleted
        # by hand). The trainer's final report, if it wrote one, still tells us how it ended.
        early = status.get("earlyStop") or {}
        if early.get("reason") in (StopReason.convergence_threshold.value, StopReason.max_steps.value):
            reason, message = succeeded_reason(status)
            return Observation(Phase.succeeded.value, reason, message, completion_time=now_iso())
        return Observation(Phase.failed.value, JOB_LOST, "the Job was deleted before it finished",
                           completion_time=now_iso())

    job_status = job.get("status") or {}
    name = job["metadata"]["name"]
    attempts = int(job_status.get("failed") or 0) + int(job_status.get("succeeded") or 0) + int(
        job_status.get("active") or 0)
    common = dict(start_time=job_status.get("startTime"), attempts=attempts or None)

    complete = _job_condition(job, "Complete")
    if complete:
        completion = job_status.get("completionTime") or complete.get("lastTransitionTime") or now_iso()
        recovered: dict[str, Any] = {}
        if not status.get("earlyStop"):
            # The trainer's final status patch never arrived (API server down, RBAC...): its pod's
            # termination message still carries the decision.
            report = termination_report(pods) or {}
            recovered = {k: v for k, v in report.items() if status.get(k) in (None, [], {})}
        reason, message = succeeded_reason({**status, **recovered})
        if recovered:
            message += " (recovered from the trainer pod's termination message)"
        return Observation(Phase.succeeded.value, reason, message, completion_time=completion,
                           recovered=recovered, **common)

    failed = _job_condition(job, "Failed")
    if failed:
        completion = failed.get("lastTransitionTime") or now_iso()
        oom = oom_killed(pods)
        if failed.get("reason") == DEADLINE:
            return Observation(Phase.failed.value, DEADLINE, f"Job {name}: {failed.get('message', '')}".strip(),
                               completion_time=completion, **common)
        if oom:
            return Observation(Phase.failed.value, OOM_KILLED, f"Job {name} failed: {oom}; raise "
                               "spec.resources.memory", completion_time=completion, **common)
        bad_input = bad_input_message(pods) if failed.get("reason") == POD_FAILURE_POLICY else None
        if bad_input:
            return Observation(Phase.failed.value, BAD_INPUT,
                               f"Job {name}: the trainer rejected its input (exit code {EXIT_BAD_INPUT}, not "
                               f"retried): {bad_input}", completion_time=completion, **common)
        reason = failed.get("reason") or BACKOFF_LIMIT
        return Observation(Phase.failed.value, reason, f"Job {name}: {failed.get('message', 'failed')}",
                           completion_time=completion, **common)

    pull = image_pull_failure(pods)
    if pull:
        return Observation(Phase.failed.value, IMAGE_PULL, pull, completion_time=now_iso(), delete_job=True, **common)

    if job.get("spec", {}).get("suspend"):
        queue = job["metadata"].get("labels", {}).get("kueue.x-k8s.io/queue-name")
        if queue:
            return Observation(Phase.queued.value, "WaitingForKueue",
                               f"Job {name} is suspended until Kueue admits it (LocalQueue {queue})", **common)
        return Observation(Phase.queued.value, "Suspended", f"Job {name} is suspended", **common)

    if int(job_status.get("ready") or 0) > 0:
        return Observation(Phase.running.value, "PodRunning", f"Job {name} is running", **common)
    if int(job_status.get("failed") or 0) > 0 and int(job_status.get("active") or 0) > 0:
        return Observation(Phase.pending.value, "Restarting",
                           f"Job {name}: attempt {attempts} starting after {job_status['failed']} failed", **common)
    if int(job_status.get("active") or 0) > 0:
        return Observation(Phase.pending.value, "PodStarting", f"Job {name}: its pod is starting", **common)
    return Observation(Phase.pending.value, JOB_CREATED, job_created_message(name), **common)


# ---- conditions --------------------------------------------------------------------------------


def set_condition(conditions: list[dict], type_: str, status: str, reason: str, message: str,
                  now: str) -> list[dict]:
    """A new list with `type_` set; lastTransitionTime moves only when the status flips."""
    out = []
    found = False
    for cond in conditions:
        if cond.get("type") != type_:
            out.append(cond)
            continue
        found = True
        changed = cond.get("status") != status
        out.append({
            "type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": now if changed else cond.get("lastTransitionTime", now),
        })
    if not found:
        out.append({"type": type_, "status": status, "reason": reason, "message": message,
                    "lastTransitionTime": now})
    return out


def get_condition(status: dict, type_: str) -> Optional[dict]:
    for cond in status.get("conditions") or []:
        if cond.get("type") == type_:
            return cond
    return None


def phase_conditions(conditions: list[dict], phase: str, reason: str, message: str, now: str) -> list[dict]:
    """Conditions that follow from entering `phase` (for reason/message of the phase itself)."""
    if phase == Phase.queued.value:
        conditions = set_condition(conditions, QUEUED, "True", reason, message, now)
        conditions = set_condition(conditions, RUNNING, "False", reason, message, now)
    elif phase == Phase.pending.value:
        if get_condition({"conditions": conditions}, QUEUED):
            conditions = set_condition(conditions, QUEUED, "False", "Admitted", message, now)
        conditions = set_condition(conditions, RUNNING, "False", reason, message, now)
    elif phase == Phase.running.value:
        if get_condition({"conditions": conditions}, QUEUED):
            conditions = set_condition(conditions, QUEUED, "False", "Admitted", "admitted", now)
        conditions = set_condition(conditions, RUNNING, "True", reason, message, now)
    elif phase == Phase.succeeded.value:
        conditions = set_condition(conditions, RUNNING, "False", "Completed", message, now)
        conditions = set_condition(conditions, SUCCEEDED, "True", reason, message, now)
    elif phase == Phase.failed.value:
        if get_condition({"conditions": conditions}, QUEUED):
            conditions = set_condition(conditions, QUEUED, "False", reason, message, now)
        conditions = set_condition(conditions, RUNNING, "False", reason, message, now)
        conditions = set_condition(conditions, FAILED, "True", reason, message, now)
    return conditions


def lifecycle_patch(status: dict, obs: Observation, now: Optional[str] = None) -> Optional[dict]:
    """The status merge patch that brings `status` in line with `obs`, or None if nothing changes."""
    now = now or now_iso()
    patch: dict[str, Any] = {}
    conditions = phase_conditions(list(status.get("conditions") or []), obs.phase, obs.reason, obs.message, now)
    if conditions != (status.get("conditions") or []):
        patch["conditions"] = conditions
    if status.get("phase") != obs.phase:
        patch["phase"] = obs.phase
    if obs.start_time and not status.get("startTime"):
        patch["startTime"] = obs.start_time
    if obs.completion_time and obs.phase in TERMINAL and not status.get("completionTime"):
        patch["completionTime"] = obs.completion_time
    if obs.attempts is not None and status.get("attempts") != obs.attempts:
        patch["attempts"] = obs.attempts
    patch.update(obs.recovered)
    return patch or None


def phase_reason(status: dict) -> tuple[Optional[str], str]:
    """The current phase and the reason of the condition that explains it."""
    phase = status.get("phase")
    by_phase = {Phase.queued.value: QUEUED, Phase.pending.value: RUNNING, Phase.running.value: RUNNING,
                Phase.succeeded.value: SUCCEEDED, Phase.failed.value: FAILED}
    cond = get_condition(status, by_phase.get(phase, "")) if phase else None
    return phase, (cond or {}).get("reason", "")
