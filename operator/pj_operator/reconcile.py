"""What the handlers do, written against a `Kube` client and plain dicts.

reconcile()      create/resume/spec-change-before-start: validate, queue or admit, create children
refuse_change()  spec changed after the Job was created: say so, change nothing (and clear
                 the refusal when the spec is changed back to the one the Job runs)
sync_lifecycle() Job/pod state -> phase, conditions, times, attempts (+ event, metrics)
Everything starts from the resource as the API server has it; nothing is remembered between calls.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import kopf
import yaml

from personalize import spec as api

from . import capacity, children, lifecycle, metrics, names, pack_metrics, pack_reconcile, packing, status
from .kube import ApiError, Kube
from .lifecycle import TERMINAL
from .names import PJ_API_VERSION
from .settings import Settings
from .validation import parse_body, validate_job

logger = logging.getLogger(__name__)

Phase = api.Phase


def _meta(obj: dict) -> tuple[str, str, str]:
    meta = obj["metadata"]
    return meta["namespace"], meta["name"], meta.get("uid", "")


def _without(conditions: list[dict], *types: str) -> list[dict]:
    return [c for c in conditions if c.get("type") not in types]


_phase_changed = status.phase_changed
_transition_event = status.transition_event  # shared with packs' members (pack_reconcile)


# ---- validation --------------------------------------------------------------------------------


def mark_invalid(kube: Kube, obj: dict, problems: list[str]) -> None:
    namespace, name, _ = _meta(obj)
    message = "; ".join(problems)

    def compute(fresh: dict) -> Optional[dict]:
        st = fresh.get("status") or {}
        now = lifecycle.now_iso()
        conds = lifecycle.set_condition(list(st.get("conditions") or []), lifecycle.VALID, "False",
                                        lifecycle.INVALID_SPEC, message, now)
        conds = lifecycle.phase_conditions(conds, Phase.failed.value, lifecycle.INVALID_SPEC, message, now)
        patch: dict[str, Any] = {"phase": Phase.failed.value, "conditions": conds,
                                 "observedGeneration": fresh["metadata"].get("generation")}
        if all(st.get(k) == v for k, v in patch.items()):
            return None
        return patch

    before, patch = status.update(kube, namespace, name, compute)
    if patch:  # a new problem list is worth a new Warning, even without a phase change
        status.event(before, warning=True, reason=lifecycle.INVALID_SPEC, message=message)
    if _phase_changed(before, patch):
        metrics.COMPLETIONS.labels(reason=lifecycle.INVALID_SPEC).inc()


# ---- admission -------------------------------------------------------------------------------


def mark_queued(kube: Kube, obj: dict, reason: str, message: str) -> None:
    namespace, name, _ = _meta(obj)

    def compute(fresh: dict) -> Optional[dict]:
        st = fresh.get("status") or {}
        if st.get("jobName") or (st.get("phase") in TERMINAL
                                 and lifecycle.phase_reason(st)[1] != lifecycle.INVALID_SPEC):
            return None  # admitted or finished meanwhile
        now = lifecycle.now_iso()
        conds = _without(list(st.get("conditions") or []), lifecycle.FAILED)
        conds = lifecycle.set_condition(conds, lifecycle.VALID, "True", "Validated", "spec is valid", now)
        conds = lifecycle.phase_conditions(conds, Phase.queued.value, reason, message, now)
        patch = {"phase": Phase.queued.value, "conditions": conds,
                 "observedGeneration": fresh["metadata"].get("generation")}
        if all(st.get(k) == v for k, v in patch.items()):
            return None
        return patch

    before, patch = status.update(kube, namespace, name, compute)
    if before is not None:
        _transition_event(before, patch, reason, message)


def admit(kube: Kube, obj: dict, parsed: api.PersonalizationJob, settings: Settings) -> bool:
    """Claim the slot in status (phase Pending, jobName), then create the children.

    Status first: another admission decision that lists the resources sees the slot taken.
    Should we crash in between, `reconcile` finds jobName set and no Job, and creates it then.
    """
    namespace, name, _ = _meta(obj)
    job_name = names.job_name(name)
    kueue = bool(parsed.spec.queue_name)
    phase = Phase.queued.value if kueue else Phase.pending.value
    # The same reason and message the Job's first event will yield: no second write for it.
    reason = "WaitingForKueue" if kueue else lifecycle.JOB_CREATED
    message = (f"Job {job_name} is suspended until Kueue admits it (LocalQueue {parsed.spec.queue_name})"
               if kueue else lifecycle.job_created_message(job_name))

    def compute(fresh: dict) -> Optional[dict]:
        st = fresh.get("status") or {}
        if st.get("jobName"):
            return None
        now = lifecycle.now_iso()
        conds = _without(list(st.get("conditions") or []), lifecycle.FAILED)
        conds = lifecycle.set_condition(conds, lifecycle.VALID, "True", "Validated", "spec is valid", now)
        conds = lifecycle.phase_conditions(conds, phase, reason, message, now)
        return {"phase": phase, "jobName": job_name, "conditions": conds,
                "observedGeneration": fresh["metadata"].get("generation")}

    before, patch = status.update(kube, namespace, name, compute)
    if before is None:
        return False  # deleted meanwhile
    create_children(kube, before, parsed, settings)
    _transition_event(before, patch, reason, message)
    return True


def create_children(kube: Kube, owner: dict, parsed: api.PersonalizationJob, settings: Settings) -> None:
    """Create what is missing; accept what exists only if this resource owns it."""
    namespace, name, uid = _meta(owner)
    manifests = children.all_children(parsed, name, namespace, settings)
    # Owner references only: kopf.adopt would also copy every label of the resource (GitOps
    # tracking labels, a kueue.x-k8s.io/queue-name) onto the children and the pod template.
    kopf.append_owner_reference(manifests, owner=owner)
    for manifest in manifests:
        _create_child(kube, owner, manifest, settings)


def owned_by(obj: Optional[dict], uid: str) -> bool:
    return obj is not None and any(ref.get("uid") == uid for ref in obj.get("metadata", {}).get("ownerReferences", []))


def _predecessor(existing: dict, name: str) -> Optional[str]:
    """The uid of an earlier PersonalizationJob of the same name that owns `existing`, if any:
    deleted and re-created, its children wait for the garbage collector."""
    for ref in existing.get("metadata", {}).get("ownerReferences", []):
        if ref.get("kind") == api.KIND and ref.get("apiVersion") == PJ_API_VERSION and ref.get("name") == name:
            return ref.get("uid")
    return None


def _create_child(kube: Kube, owner: dict, manifest: dict, settings: Settings) -> None:
    """Create one child. A 409 means "it exists" (ours: fine; an earlier resource's of the same
    name: wait for the garbage collector; anyone else's: never taken over) or, if nothing is
    there, a conflict that a second attempt resolves."""
    namespace, name, uid = _meta(owner)
    what = f"{manifest['kind']} {manifest['metadata']['name']}"
    for attempt in range(2):
        try:
            kube.create(manifest)
            return
        except ApiError as err:
            if err.status != 409:
                # Quota, admission webhook, RBAC, a server that stayed unavailable through the
                # client's retries...: tell the user, and let kopf retry later.
                report_child_failure(kube, owner, "ChildCreationFailed", f"cannot create {what}: {err}")
                raise kopf.TemporaryError(str(err), delay=settings.retry_delay) from None
            existing = kube.get(manifest["apiVersion"], manifest["kind"], namespace, manifest["metadata"]["name"])
            if existing is None:
                continue  # 409 but nothing there: a conflict, not an existing object; try again
            if owned_by(existing, uid):
                return  # ours already (created by an earlier attempt or operator run)
            predecessor = _predecessor(existing, name)
            if predecessor:
                message = (f"{what} is still owned by an earlier PersonalizationJob of this name (uid {predecessor}); "
                           "waiting for the garbage collector to delete it")
                report_child_failure(kube, owner, "WaitingForPredecessor", message, warning=False)
                raise kopf.TemporaryError(message, delay=settings.retry_delay) from None
            message = f"{what} already exists and is not owned by this PersonalizationJob"
            report_child_failure(kube, owner, "NameConflict", message)
            raise kopf.PermanentError(message) from None
    raise kopf.TemporaryError(f"cannot create {what}: repeated conflicts", delay=settings.retry_delay)


def report_child_failure(kube: Kube, owner: dict, reason: str, message: str, warning: bool = True) -> None:
    """A child could not be created: say why on the Running condition and in an Event."""
    namespace, name, _ = _meta(owner)

    def compute(fresh: dict) -> Optional[dict]:
        st = fresh.get("status") or {}
        conds = lifecycle.set_condition(list(st.get("conditions") or []), lifecycle.RUNNING, "False",
                                        reason, message, lifecycle.now_iso())
        return {"conditions": conds} if conds != st.get("conditions") else None

    before, patch = status.update(kube, namespace, name, compute)
    if patch:
        status.event(before, warning=warning, reason=reason, message=message)


def reconcile(kube: Kube, body: dict, settings: Settings,
              everyone: Optional[Callable[[], list[dict]]] = None) -> None:
    """`everyone`: the PersonalizationJobs as the watches show them (the create and update
    handlers pass kopf's index); without it, the capacity decision lists them."""
    st = body.get("status") or {}
    phase, reason = lifecycle.phase_reason(st)
    if phase in TERMINAL and reason != lifecycle.INVALID_SPEC:
        return
    checked = validate_job(body, settings)
    if not checked.ok:
        mark_invalid(kube, body, checked.problems)
        return
    namespace, name, uid = _meta(body)
    if st.get("jobName") and pack_reconcile.is_packed(body):
        pack_reconcile.resume_member(kube, body, checked.job, settings)
        return
    if st.get("jobName"):
        # Admitted earlier (maybe by a previous operator run): finish what is missing, never re-run.
        job = kube.get("batch/v1", "Job", namespace, st["jobName"])
        if owned_by(job, uid):
            return
        # No Job, or an earlier resource's that the garbage collector has yet to delete.
        if job is None and (st.get("progress") or st.get("earlyStop")):
            sync_lifecycle(kube, namespace, name, None, [])  # it ran, and its Job is gone
        else:
            create_children(kube, body, checked.job, settings)
        return
    packable = pack_reconcile.unpackable(checked.job, name, settings) is None
    if packable and pack_reconcile.admit(kube, body, checked.job, settings, may_found=False):
        return  # joined an open pack: it needs no slot of its own
    cap = settings.max_concurrent_jobs
    if checked.job.spec.queue_name or cap <= 0:
        admit_any(kube, body, checked.job, settings)
        return
    decision = decide(kube, body, settings, everyone)
    if decision.admit:
        admit_any(kube, body, checked.job, settings)
    else:
        mark_queued(kube, body, "WaitingForCapacity", decision.message)


def admit_any(kube: Kube, body: dict, parsed: api.PersonalizationJob, settings: Settings) -> None:
    """Admit a job that has a slot: into a pack when it may share one, else into a Job of its own."""
    name = body["metadata"]["name"]
    if pack_reconcile.unpackable(parsed, name, settings) is None:
        pack_reconcile.admit(kube, body, parsed, settings, may_found=True)
    else:
        admit(kube, body, parsed, settings)


def list_pjs(kube: Kube, settings: Settings) -> list[dict]:
    if not settings.namespaces:
        return kube.list(PJ_API_VERSION, api.KIND)
    return [pj for ns in settings.namespaces for pj in kube.list(PJ_API_VERSION, api.KIND, ns)]


def priorities(kube: Kube, waiting: list[dict]) -> tuple[dict[str, int], int]:
    """The PriorityClass values that order `waiting`. Listed only when one of them names a class:
    otherwise every one has the global default's value, and age alone orders them."""
    if not any(capacity.priority_class(pj) for pj in waiting):
        return {}, 0
    try:
        return capacity.priority_values(kube.list("scheduling.k8s.io/v1", "PriorityClass"))
    except ApiError as err:
        logger.warning("cannot list PriorityClasses (%s); ordering by creation time only", err)
        return {}, 0


def decide(kube: Kube, body: dict, settings: Settings,
           everyone: Optional[Callable[[], list[dict]]] = None) -> capacity.Decision:
    pjs = everyone() if everyone is not None else list_pjs(kube, settings)
    values, default = priorities(kube, [body, *(pj for pj in pjs if capacity.is_waiting(pj))])
    return capacity.decide(body, pjs, settings.max_concurrent_jobs, values, default)


# ---- spec changes ------------------------------------------------------------------------------


def runs_started_spec(kube: Kube, body: dict) -> bool:
    """Whether the resource's spec is again the one its Job runs (the ConfigMap is its snapshot)."""
    namespace, name, _ = _meta(body)
    pack = ((body.get("status") or {}).get("pack") or {}).get("job")
    # A pack's ConfigMap holds each member's manifest under <member>.yaml.
    config_name, key = (names.config_map_name(pack), packing.config_key(name)) if pack else \
        (names.config_map_name(name), names.CONFIG_KEY)
    try:
        config = kube.get("v1", "ConfigMap", namespace, config_name)
        started = yaml.safe_load(((config or {}).get("data") or {})[key])
        current = parse_body(body)
    except (ApiError, KeyError, TypeError, yaml.YAMLError, api.SpecError):
        return False  # cannot tell: keep refusing
    return started == children.trainer_manifest(current, name, namespace)


def refuse_change(kube: Kube, body: dict, changed: list[str]) -> None:
    namespace, name, _ = _meta(body)
    generation = body["metadata"].get("generation")
    job_name = (body.get("status") or {}).get("jobName")
    reverted = runs_started_spec(kube, body)
    if reverted:
        value, reason = "False", "SpecMatchesJob"
        message = f"the spec is back to the one Job {job_name} runs"
    else:
        value, reason = "True", "SpecImmutableAfterStart"
        message = (f"spec changed ({', '.join(changed) or 'spec'}) after Job {job_name} was created; the Job keeps "
                   "running the spec it started with. Delete and re-create the PersonalizationJob to apply changes.")

    def compute(fresh: dict) -> Optional[dict]:
        st = fresh.get("status") or {}
        conds = list(st.get("conditions") or [])
        if reverted and not any(c.get("type") == lifecycle.SPEC_CHANGE_REFUSED for c in conds):
            return {"observedGeneration": generation}  # never refused: nothing to clear
        conds = lifecycle.set_condition(conds, lifecycle.SPEC_CHANGE_REFUSED, value, reason, message, lifecycle.now_iso())
        return {"conditions": conds, "observedGeneration": generation}

    before, patch = status.update(kube, namespace, name, compute)
    if patch and not reverted:
        status.event(before, warning=True, reason="SpecChangeRefused", message=message)


# ---- lifecycle ---------------------------------------------------------------------------------


def job_pods(kube: Kube, namespace: str, pj_name: str) -> list[dict]:
    return kube.list("v1", "Pod", namespace, {names.LABEL_JOB: pj_name, names.LABEL_APP: names.TRAINER_APP})


def sync_lifecycle(kube: Kube, namespace: str, name: str, job: Optional[dict], pods: list[dict],
                   owner_uid: Optional[str] = None, events: Optional[list[dict]] = None,
                   limits: Optional[lifecycle.StartLimits] = None) -> Optional[dict]:
    """Bring phase/conditions in line with the Job; returns the patch written (None if none).
    `events` and `limits`: also fail a job whose pod cannot start (see lifecycle.start_failure)."""
    observed: dict[str, lifecycle.Observation] = {}
    asked = {"fresh": False}

    def compute(fresh: dict) -> Optional[dict]:
        nonlocal pods
        st = fresh.get("status") or {}
        if owner_uid and fresh["metadata"].get("uid") != owner_uid:
            return None  # a Job of an older resource with the same name
        if st.get("phase") in TERMINAL or not st.get("jobName"):
            return None
        if lifecycle.job_condition(job, "Complete") and not st.get("earlyStop") and not pods:
            if not asked["fresh"]:
                asked["fresh"] = True
                raise status.Stale  # the trainer's final patch may be newer than our copy
            # Completed without the trainer's decision in status: read its termination message.
            pods = job_pods(kube, namespace, name)
        obs = lifecycle.observe_job(job, pods, st, events, limits)
        observed["obs"] = obs
        return lifecycle.lifecycle_patch(st, obs)

    before, patch = status.update(kube, namespace, name, compute)
    if not patch or before is None:
        return patch
    obs = observed["obs"]
    _transition_event(before, patch, obs.reason, obs.message)
    if patch.get("phase") in TERMINAL:
        spec = before.get("spec") or {}
        gpus = int((spec.get("resources") or {}).get("gpus", 1))
        final_status = {**(before.get("status") or {}), **obs.recovered}
        metrics.record_completion(patch["phase"], obs.reason, spec.get("method", ""), final_status, gpus)
        if patch["phase"] == Phase.succeeded.value:
            pack_metrics.record_solo(job, final_status, gpus)
        if obs.recovered:
            status.event(before, warning=False, reason="DecisionRecovered",
                         message="the trainer's final status was missing; recovered "
                                 f"{', '.join(sorted(obs.recovered))} from its pod's termination message")
    if obs.delete_job and job is not None:
        # The pod can never start but would keep its node's GPU: remove the Job (the resource
        # keeps the record in its status and events).
        kube.delete("batch/v1", "Job", namespace, job["metadata"]["name"])
    return patch
