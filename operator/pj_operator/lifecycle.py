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

from .names import EXIT_BAD_INPUT, EXIT_STATUS_UNREPORTED, TRAINER_CONTAINER

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
CONTAINER_CONFIG = "CreateContainerConfigError"  # e.g. a Secret or key the pod names is missing
CONTAINER_CREATE = "CreateContainerError"
FAILED_CREATE = "FailedCreate"  # the Job controller could not create the pod: quota, webhook, PriorityClass
VOLUME_ATTACH = "FailedAttachVolume"  # e.g. Multi-Attach of a ReadWriteOnce volume in use on another node
VOLUME_MOUNT = "FailedMount"
PENDING_DEADLINE = "PendingDeadlineExceeded"
OOM_KILLED = "OOMKilled"
DEADLINE = "DeadlineExceeded"
BACKOFF_LIMIT = "BackoffLimitExceeded"
JOB_LOST = "JobLost"
BAD_INPUT = "BadInput"  # the trainer exited 2: podFailurePolicy failed the Job without retries
POD_FAILURE_POLICY = "PodFailurePolicy"  # the Job's own reason for a FailJob rule
# Pending reasons.
JOB_CREATED = "JobCreated"
# Succeeded reasons: the trainer's own stop reasons, so that a condition, the STOP REASON column,
# the completions metric and the dashboards name an ending the same way.
EARLY_STOPPED = StopReason.convergence_threshold.value
MAX_STEPS = StopReason.max_steps.value
COMPLETED = "Completed"

SUCCESS_REASONS = (EARLY_STOPPED, MAX_STEPS, COMPLETED)
# Every failure reason the operator itself decides. A Job may also fail for a reason of its own
# (its Failed condition's reason, e.g. PodFailurePolicy, MaxFailedIndexesExceeded), passed through.
START_FAILURE_REASONS = (IMAGE_PULL, CONTAINER_CONFIG, CONTAINER_CREATE, FAILED_CREATE, VOLUME_ATTACH, VOLUME_MOUNT,
                         PENDING_DEADLINE)
FAILURE_REASONS = (INVALID_SPEC, OOM_KILLED, DEADLINE, BACKOFF_LIMIT, JOB_LOST, BAD_INPUT,
                   POD_FAILURE_POLICY) + START_FAILURE_REASONS

# Why a pod does not start, and which grace period applies before the job fails. Image pulls are
# retried by the kubelet and often recover (registry rate limits, blips); the others rarely do.
_PULL_NEVER = ("InvalidImageName", "ErrImageNeverPull")  # fail at once: no retry can help
_PULL_RETRYING = ("ImagePullBackOff", "ErrImagePull")
_WAITING_FAILURES = (CONTAINER_CONFIG, CONTAINER_CREATE)
_POD_EVENT_FAILURES = (VOLUME_ATTACH, VOLUME_MOUNT)


@dataclass(frozen=True)
class StartLimits:
    """How long a pod may fail to start before the job fails (seconds; 0 pending deadline: none)."""
    image_pull_grace: float = 300.0
    start_failure_grace: float = 60.0
    pending_deadline: float = 3600.0


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


def job_condition(job: Optional[dict], type_: str) -> Optional[dict]:
    """The Job's condition of `type_` (Complete, Failed, Suspended...) if it is True, else None."""
    for cond in ((job or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return cond
    return None


def parse_time(value: Optional[str]) -> Optional[datetime.datetime]:
    """A Kubernetes timestamp (RFC 3339, seconds or microseconds), or None."""
    if not value:
        return None
    try:
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _age(timestamp: Optional[str], now: datetime.datetime) -> float:
    when = parse_time(timestamp)
    return (now - when).total_seconds() if when else 0.0


def _event_time(event: dict) -> Optional[str]:
    return event.get("firstTimestamp") or event.get("eventTime") or event.get("metadata", {}).get("creationTimestamp")


def _events_about(events: list[dict], kind: str, name: str) -> list[dict]:
    """Warning events on one object, oldest first."""
    about = [e for e in events if e.get("type") == "Warning" and e.get("involvedObject", {}).get("kind") == kind
             and e.get("involvedObject", {}).get("name") == name]
    return sorted(about, key=lambda e: e.get("lastTimestamp") or _event_time(e) or "")


def start_failure(job: dict, pods: list[dict], events: list[dict], limits: StartLimits,
                  now: Optional[datetime.datetime] = None) -> Optional[tuple[str, str]]:
    """(reason, message) when the Job's pod cannot start and its grace period is over, else None.

    `pods` are the Job's pods, `events` the Warning events of its namespace (Job and pods).
    Ages count from the pod's creation (a kubelet problem) or from the event (FailedCreate)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if job_condition(job, "Complete") or job_condition(job, "Failed") or (job.get("spec") or {}).get("suspend"):
        return None
    if int((job.get("status") or {}).get("ready") or 0) > 0:
        return None
    pending = [p for p in pods if (p.get("status") or {}).get("phase", "Pending") == "Pending"]
    for pod in pending:
        name = pod["metadata"]["name"]
        age = _age(pod["metadata"].get("creationTimestamp"), now)
        for cs in _container_statuses(pod):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            reason, detail = waiting.get("reason", ""), waiting.get("message") or cs.get("image", "")
            if reason in _PULL_NEVER or (reason in _PULL_RETRYING and age >= limits.image_pull_grace):
                return IMAGE_PULL, f"pod {name}: {reason}: {detail}"
            if reason in _WAITING_FAILURES and age >= limits.start_failure_grace:
                return reason, f"pod {name}: {reason}: {detail}"
        for event in _events_about(events, "Pod", name):
            if event.get("reason") in _POD_EVENT_FAILURES and age >= limits.start_failure_grace:
                return event["reason"], f"pod {name}: {event['reason']}: {event.get('message', '')}"
    if not pending and int((job.get("status") or {}).get("active") or 0) == 0:
        refused = [e for e in _events_about(events, "Job", job["metadata"]["name"]) if e.get("reason") == FAILED_CREATE]
        if refused and _age(_event_time(refused[0]), now) >= limits.start_failure_grace:
            return FAILED_CREATE, f"Job {job['metadata']['name']}: {FAILED_CREATE}: {refused[-1].get('message', '')}"
    if limits.pending_deadline:
        since = max([job.get("status", {}).get("startTime") or job["metadata"].get("creationTimestamp") or ""]
                    + [p["metadata"].get("creationTimestamp") or "" for p in pods])
        if since and _age(since, now) >= limits.pending_deadline:
            return PENDING_DEADLINE, (f"Job {job['metadata']['name']}: no pod started within "
                                      f"{limits.pending_deadline:g} s; {_last_word(job, pending, events)}")
    return None


def _last_word(job: dict, pending: list[dict], events: list[dict]) -> str:
    """What holds the pod, as the kubelet, the scheduler or the Job controller last said it."""
    for pod in pending:
        for cs in _container_statuses(pod):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason"):
                return f"pod {pod['metadata']['name']}: {waiting['reason']}: {waiting.get('message', '')}"
    said = [e for p in pending for e in _events_about(events, "Pod", p["metadata"]["name"])]
    said += _events_about(events, "Job", job["metadata"]["name"])
    if said:
        last = max(said, key=lambda e: e.get("lastTimestamp") or _event_time(e) or "")
        return f"{last['involvedObject']['kind'].lower()} {last['involvedObject']['name']}: {last.get('reason')}: {last.get('message', '')}"
    return "no event says why"


def _container_statuses(pod: dict) -> list[dict]:
    status = pod.get("status", {})
    return (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or [])


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
    """The trainer's final report from the termination message of its pod that finished the run
    (exit 0, or EXIT_STATUS_UNREPORTED after a failed final status patch), or None.

    The trainer writes its result.json (compact JSON; under 4096 bytes, else the subset
    earlyStop/progress/identifier/artifact) to /dev/termination-log; the kubelet copies it into
    the container status. Anything that is not a valid TrainerReport is ignored; NaN or Infinity
    in it (a diverged loss) become null, which is what JSON and the API server accept."""
    finished = _trainer_terminations(pods, "Succeeded") + [
        t for t in _trainer_terminations(pods, "Failed")[:1] if t.get("exitCode") == EXIT_STATUS_UNREPORTED]
    for terminated in finished:
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


def _recovered_report(pods: list[dict], status: dict) -> dict[str, Any]:
    """Trainer fields from the termination message that status lacks (its final patch was lost)."""
    report = termination_report(pods) or {}
    return {k: v for k, v in report.items() if status.get(k) in (None, [], {})}


def observe_job(job: Optional[dict], pods: list[dict], status: dict, events: Optional[list[dict]] = None,
                limits: Optional[StartLimits] = None, now: Optional[datetime.datetime] = None) -> Observation:
    """What phase the resource is in, given its Job (None: the Job is gone) and the Job's pods.

    With `limits` (the periodic resync, which lists pods and events), a pod that cannot start
    fails the job once its grace period is over."""
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

    complete = job_condition(job, "Complete")
    if complete:
        completion = job_status.get("completionTime") or complete.get("lastTransitionTime") or now_iso()
        # The trainer's final status patch never arrived (API server down, RBAC...): its pod's
        # termination message still carries the decision.
        recovered = {} if status.get("earlyStop") else _recovered_report(pods, status)
        reason, message = succeeded_reason({**status, **recovered})
        if recovered:
            message += " (recovered from the trainer pod's termination message)"
        return Observation(Phase.succeeded.value, reason, message, completion_time=completion,
                           recovered=recovered, **common)

    failed = job_condition(job, "Failed")
    if failed:
        completion = failed.get("lastTransitionTime") or now_iso()
        unreported = failed.get("reason") == POD_FAILURE_POLICY and any(
            t.get("exitCode") == EXIT_STATUS_UNREPORTED for t in _trainer_terminations(pods, "Failed")[:1])
        if unreported:
            # The run finished but could not write its status; its pod's message is the result.
            recovered = _recovered_report(pods, status)
            if recovered.get("earlyStop") or status.get("earlyStop"):
                reason, message = succeeded_reason({**status, **recovered})
                message += " (the trainer could not write its status; recovered from its pod's termination message)"
                return Observation(Phase.succeeded.value, reason, message, completion_time=completion,
                                   recovered=recovered, **common)
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

    stuck = start_failure(job, pods, events or [], limits, now) if limits is not None else None
    if stuck:
        # The pod can never start but would keep its node's GPU and its slot: delete the Job.
        return Observation(Phase.failed.value, stuck[0], stuck[1], completion_time=now_iso(), delete_job=True,
                           **common)

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
    # An active pod that is not ready yet is still "waiting for its pod": the same condition as
    # before it existed, so no status write (the pod's own events tell its progress).
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
    if set(patch) <= {"startTime", "attempts"}:
        return None  # bookkeeping alone is not worth a write: it rides along with the next transition
    return patch


def phase_reason(status: dict) -> tuple[Optional[str], str]:
    """The current phase and the reason of the condition that explains it."""
    phase = status.get("phase")
    by_phase = {Phase.queued.value: QUEUED, Phase.pending.value: RUNNING, Phase.running.value: RUNNING,
                Phase.succeeded.value: SUCCEEDED, Phase.failed.value: FAILED}
    cond = get_condition(status, by_phase.get(phase, "")) if phase else None
    return phase, (cond or {}).get("reason", "")
