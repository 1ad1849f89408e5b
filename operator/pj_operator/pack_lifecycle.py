"""From a pack's Job (and pods) and one member's own status to that member's phase. Pure.

A member's run ends before its pack's does: the trainer reports it in the member's status
(earlyStop, as a solo run's final report) and the pod trains on. So a member's end is read from
its own report first, and from the Job only when the whole pack ended; while the pack runs, its
Job says what a solo Job would say (Pending, Running, Queued by Kueue, a pod that cannot start).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from personalize.spec import Phase, StopReason

from . import lifecycle
from .lifecycle import Observation, StartLimits

FINISHED = (StopReason.convergence_threshold.value, StopReason.max_steps.value)

# A member the pack's trainer never took up (the pack ended first): it waits for another pack.
PACK_ENDED = "PackEnded"
# Reason of a member that joined a pack whose pod already runs.
JOINED = "JoinedPack"
COLLECTING = "CollectingMembers"
# Failed: the trainer reported this member Failed (earlyStop.reason Failed, its message).
TRAINER_FAILED = "TrainerFailed"
# Failed: a second pack also ended without its trainer taking the member up.
NEVER_TRAINED = "NeverTrained"


def report_reason(status: dict) -> Optional[str]:
    return (status.get("earlyStop") or {}).get("reason")


def never_trained(status: dict) -> bool:
    return not status.get("progress") and not status.get("earlyStop")


def trainer_failed(status: dict, pack: str) -> Observation:
    """The trainer failed this member: bad input, a manifest that cannot join, or an error in the
    step it shared (which fails every member that trained in it). The trainer's decision is final:
    a restarted pack does not train a member whose result says Failed."""
    message = status.get("message") or "the trainer reported no reason"
    return Observation(Phase.failed.value, TRAINER_FAILED, f"pack {pack}: the trainer failed this job: {message}",
                       completion_time=lifecycle.now_iso())


def observe_member(pack: str, job: Optional[dict], pods: list[dict], status: dict,
                   events: Optional[list[dict]] = None, limits: Optional[StartLimits] = None) -> Optional[Observation]:
    """The member's phase, or None when it should leave the pack unharmed (the pack's trainer
    exited 0 before it took the member up: it is released and packed again)."""
    reason = report_reason(status)
    if reason in FINISHED:
        name, message = lifecycle.succeeded_reason(status)
        return Observation(Phase.succeeded.value, name, message, completion_time=lifecycle.now_iso())
    if reason == StopReason.failed.value:
        return trainer_failed(status, pack)
    if job is None:
        return lifecycle.observe_job(None, pods, status)  # Job deleted: JobLost, as solo
    if lifecycle.job_condition(job, "Complete"):
        if never_trained(status):
            return None  # the trainer exited before it took this member up
        return lifecycle.observe_job(job, [], status)  # no decision reported: Completed, as solo
    if lifecycle.job_condition(job, "Failed"):
        return lifecycle.observe_job(job, pods, status)  # the pack's failure is every running member's
    return _keep_pack_reason(lifecycle.observe_job(job, pods, status, events, limits), status)


def _keep_pack_reason(obs: Observation, status: dict) -> Observation:
    """A member that joined a pack already says where it waits or runs: the Job's own "created" or
    "running" says nothing new, and rewriting it for every member would cost a request each."""
    phase, current = lifecycle.phase_reason(status)
    if phase == obs.phase and current in (JOINED, COLLECTING) and obs.reason in (lifecycle.JOB_CREATED, "PodRunning"):
        cond = lifecycle.get_condition(status, lifecycle.RUNNING) or {}
        return replace(obs, reason=current, message=cond.get("message", obs.message))
    return obs


def released_before(status: dict) -> bool:
    """Whether an ended pack already released this member once (its PackEnded condition)."""
    return lifecycle.get_condition(status, PACK_ENDED) is not None


def slots_message(pack: str, slot: int, members: list[str]) -> str:
    return f"pack {pack}, slot {slot} ({len(members)} members)"
