"""What the operator does to packs, written against a `Kube` client and plain dicts.

admit()         a packable job joins an open pack of its key, or founds one
start()         create the pack's Job: when it is full, or when its collecting time is over
leave()         a deleted member leaves its pack's ConfigMap and Role (the others go on)
sync_member()   a member's phase from its own report and its pack's Job (+ events, metrics)
resume_member() after an operator restart: the member is in its pack's objects, the Job follows

Every write follows the status-first rule of solo jobs: a member's status names its pack before
the pack's objects name the member, so a crash in between is repaired by `resume_member`, and
objects that name a member whose status does not are corrected. Changes to one namespace's packs
hold that namespace's lock in the book.
"""

from __future__ import annotations

import contextvars
import datetime
import logging
from typing import Any, Iterable, Optional

import kopf

from personalize import spec as api

from . import lifecycle, names, pack_children, pack_lifecycle, pack_metrics, packing, status
from .kube import ApiError, Kube
from .lifecycle import Observation
from .pack_book import BOOK
from .packing import Member, PackView
from .settings import Settings

logger = logging.getLogger(__name__)

Phase = api.Phase
ROLE = ("rbac.authorization.k8s.io/v1", "Role")
CONFLICT_ATTEMPTS = 3


def _meta(obj: dict) -> tuple[str, str, str]:
    meta = obj["metadata"]
    return meta["namespace"], meta["name"], meta.get("uid", "")


def unpackable(parsed: api.PersonalizationJob, name: str, settings: Settings) -> Optional[str]:
    return packing.unpackable_reason(parsed.spec, name, settings)


# ---- joining or founding -------------------------------------------------------------------------


def admit(kube: Kube, body: dict, parsed: api.PersonalizationJob, settings: Settings, may_found: bool) -> bool:
    """Join an open pack of the job's key, else (when `may_found`: the job has a slot of the
    concurrency cap) found a new one. False: nothing done (no open pack, and may not found)."""
    namespace, name, _ = _meta(body)
    key = packing.compatibility_key(parsed.spec, settings)
    with BOOK.lock(namespace):
        view = packing.choose(BOOK.packs(namespace), key, parsed.spec.output.uri, settings.packing_max_slots)
        if view is not None:
            _join(kube, body, parsed, settings, view)
            return True
        if not may_found:
            return False
        _found(kube, body, parsed, settings, key)
        return True


def _claim(kube: Kube, body: dict, pack: str, slot: int, members: list[str], phase: str, reason: str,
           message: str) -> tuple[Optional[dict], Optional[dict]]:
    """Status first: the member names its pack and slot (phase, jobName, pack)."""
    namespace, name, _ = _meta(body)

    def compute(fresh: dict) -> Optional[dict]:
        st = fresh.get("status") or {}
        if st.get("jobName"):
            return None  # admitted meanwhile
        now = lifecycle.now_iso()
        conds = [c for c in st.get("conditions") or [] if c.get("type") != lifecycle.FAILED]
        conds = lifecycle.set_condition(conds, lifecycle.VALID, "True", "Validated", "spec is valid", now)
        conds = lifecycle.phase_conditions(conds, phase, reason, message, now)
        return {"phase": phase, "jobName": pack, "pack": {"job": pack, "slot": slot, "members": members},
                "conditions": conds, "observedGeneration": fresh["metadata"].get("generation")}

    return status.update(kube, namespace, name, compute)


def _member(body: dict, slot: int) -> Member:
    _, name, uid = _meta(body)
    return Member(name=name, uid=uid, slot=slot, active=True,
                  output_uri=((body.get("spec") or {}).get("output") or {}).get("uri"))


def _found(kube: Kube, body: dict, parsed: api.PersonalizationJob, settings: Settings, key: str) -> None:
    namespace, name, uid = _meta(body)
    pack = packing.pack_name(key, uid)
    wait = settings.packing_wait_seconds if settings.packing_max_slots > 1 else 0.0
    message = (f"pack {pack}: collecting compatible jobs for up to {wait:g} s before its Job starts "
               f"(up to {settings.packing_max_slots} members)")
    before, patch = _claim(kube, body, pack, 0, [name], Phase.pending.value, pack_lifecycle.COLLECTING, message)
    if before is None or not patch:
        return  # deleted, or admitted meanwhile
    BOOK.put_member(namespace, pack, _member(before, 0))
    BOOK.set_founder(namespace, pack, parsed, name)
    ensure_objects(kube, namespace, pack, {name: parsed}, [before], settings, new=True)
    status.event(before, warning=False, reason="Packed", message=f"founded pack {pack} (slot 0)")
    schedule_start(kube, namespace, pack, settings, wait)


def _joined_phase(job: Optional[dict], pack: str, slot: int) -> tuple[str, str, str]:
    where = f"joined pack {pack} (slot {slot})"
    if job is None:
        return Phase.pending.value, pack_lifecycle.COLLECTING, f"{where}; its Job starts when the pack is full " \
                                                                "or its collecting time is over"
    if (job.get("spec") or {}).get("suspend"):
        queue = (job["metadata"].get("labels") or {}).get(names.KUEUE_QUEUE_LABEL, "")
        return Phase.queued.value, "WaitingForKueue", f"{where}; Job {pack} is suspended until Kueue admits it " \
                                                      f"(LocalQueue {queue})"
    if int((job.get("status") or {}).get("ready") or 0) > 0:
        return Phase.running.value, pack_lifecycle.JOINED, f"{where}; its trainer takes this job up at its next step"
    return Phase.pending.value, pack_lifecycle.JOINED, f"{where}; waiting for its pod"


def _join(kube: Kube, body: dict, parsed: api.PersonalizationJob, settings: Settings, view: PackView) -> None:
    namespace, name, _ = _meta(body)
    slot = view.free_slot(settings.packing_max_slots)
    members = sorted({*view.members, name})
    job = BOOK.job(namespace, view.name) if view.job_created else None
    phase, reason, message = _joined_phase(job, view.name, slot)
    before, patch = _claim(kube, body, view.name, slot, members, phase, reason, message)
    if before is None or not patch:
        return
    BOOK.put_member(namespace, view.name, _member(before, slot))
    BOOK.set_founder(namespace, view.name, parsed, name)
    ensure_objects(kube, namespace, view.name, {name: parsed}, [before], settings)
    if view.job_created:
        _own_job(kube, namespace, view.name, [before])
    status.transition_event(before, patch, reason, message)
    status.event(before, warning=False, reason="Packed", message=f"joined pack {view.name} (slot {slot})")
    if not view.job_created and len(view.active) + 1 >= settings.packing_max_slots:
        start(kube, namespace, view.name, settings)  # full: no reason to wait


# ---- the pack's objects ----------------------------------------------------------------------------


def ensure_objects(kube: Kube, namespace: str, pack: str, add: dict[str, api.PersonalizationJob],
                   owners: list[dict], settings: Settings, remove: Iterable[str] = (),
                   new: bool = False) -> Optional[dict]:
    """The ConfigMap holds exactly the members it should (plus `add`, minus `remove`), each an
    owner; the Role names them all. Creates the pack's objects on first use (`new`: a pack just
    founded, whose objects are created without looking first)."""
    files = {name: pack_children.member_file(parsed, name, namespace) for name, parsed in add.items()}
    remove = set(remove)
    config_name = names.config_map_name(pack)
    for attempt in range(CONFLICT_ATTEMPTS):
        config = None if new and not attempt else \
            BOOK.recall(namespace, pack, "ConfigMap") or kube.get("v1", "ConfigMap", namespace, config_name)
        if config is None and not add:
            return None  # gone with its last member: nothing to take out
        if config is None:
            manifest = pack_children.config_map(pack, namespace, files, pack_children.owner_references(owners))
            try:
                config = kube.create(manifest)
            except ApiError as err:
                if err.status != 409:
                    raise
                continue  # created meanwhile: read it
            BOOK.remember(namespace, pack, config)
            _ensure_support(kube, namespace, pack, config, settings)
            return config
        data = dict(config.get("data") or {})
        refs = [r for r in config["metadata"].get("ownerReferences") or [] if r.get("name") not in remove]
        known = {r.get("uid") for r in refs}
        new_refs = refs + [r for r in pack_children.owner_references(owners) if r["uid"] not in known]
        changes: dict[str, Optional[str]] = {packing.config_key(n): t for n, t in files.items()
                                             if data.get(packing.config_key(n)) != t}
        changes.update({packing.config_key(n): None for n in remove if packing.config_key(n) in data})
        if not changes and new_refs == config["metadata"].get("ownerReferences"):
            BOOK.remember(namespace, pack, config)
            return config
        body = {"metadata": {"resourceVersion": config["metadata"]["resourceVersion"], "ownerReferences": new_refs},
                "data": changes}
        try:
            config = kube.patch("v1", "ConfigMap", namespace, config_name, body)
        except ApiError as err:
            if err.status not in (404, 409):
                raise
            BOOK.forget_object(namespace, pack, "ConfigMap")
            continue  # changed or gone meanwhile: read it again
        BOOK.remember(namespace, pack, config)
        _set_role(kube, namespace, pack, config, settings, create=bool(add))
        return config
    raise kopf.TemporaryError(f"ConfigMap of pack {pack}: repeated conflicts", delay=settings.retry_delay)


def config_members(config: dict) -> list[str]:
    return sorted(filter(None, (packing.member_of(k) for k in (config.get("data") or {}))))


def _ensure_support(kube: Kube, namespace: str, pack: str, config: dict, settings: Settings) -> None:
    """ServiceAccount, Role and RoleBinding, owned by the ConfigMap (created, or found ours)."""
    founder = BOOK.founder(namespace, pack)
    parsed = founder[0] if founder else None
    account = pack_children.own_account(parsed.spec) if parsed is not None else None
    annotations = getattr(settings, "trainer_service_account_annotations", None)
    manifests = [
        *([] if account else [pack_children.service_account(pack, namespace, config, annotations)]),
        pack_children.role(pack, namespace, config, config_members(config)),
        pack_children.role_binding(pack, namespace, config, account),
    ]
    for manifest in manifests:
        try:
            created = kube.create(manifest)
        except ApiError as err:
            if err.status != 409:
                raise
            if manifest["kind"] == "Role":
                _set_role(kube, namespace, pack, config, settings, force=True)
            continue
        if created.get("kind") == "Role":
            BOOK.remember(namespace, pack, created)


def _set_role(kube: Kube, namespace: str, pack: str, config: dict, settings: Settings, force: bool = False,
              create: bool = True) -> None:
    """The Role names exactly the members in the ConfigMap (the trainer's own members); a missing
    Role is created (with the other objects owned by the ConfigMap) when `create`."""
    members = config_members(config)
    if not members:
        return  # the last member left: the garbage collector removes the pack
    rules = pack_children.role_rules(members)
    role = BOOK.recall(namespace, pack, "Role")
    if not force and role is not None and role.get("rules") == rules:
        return
    try:
        role = kube.patch(*ROLE, namespace, names.trainer_account_name(pack), {"rules": rules})
    except ApiError as err:
        if err.status != 404:
            raise
        if create:
            _ensure_support(kube, namespace, pack, config, settings)
        return
    BOOK.remember(namespace, pack, role)


def _own_job(kube: Kube, namespace: str, pack: str, owners: list[dict]) -> None:
    """Every member owns the pack's Job: it goes only with its last member."""
    job = BOOK.job(namespace, pack) or kube.get("batch/v1", "Job", namespace, pack)
    if job is None:
        return
    refs = list(job["metadata"].get("ownerReferences") or [])
    known = {r.get("uid") for r in refs}
    added = [r for r in pack_children.owner_references(owners) if r["uid"] not in known]
    if not added:
        return
    try:
        answer = kube.patch("batch/v1", "Job", namespace, pack, {"metadata": {"ownerReferences": refs + added}})
    except ApiError as err:
        if err.status != 404:
            raise
        return  # gone meanwhile: its end is handled by the Job watch
    BOOK.observe_job(answer)


# ---- starting the pack's Job -------------------------------------------------------------------------


def schedule_start(kube: Kube, namespace: str, pack: str, settings: Settings, delay: float) -> None:
    """Start the pack's Job in `delay` seconds (its collecting time), in kopf's context (events)."""
    context = contextvars.copy_context()

    def fire() -> None:
        try:
            context.run(start, kube, namespace, pack, settings)
        except Exception:  # the API server refused: try again later
            logger.exception("cannot start pack %s/%s; retrying in %g s", namespace, pack, settings.retry_delay)
            BOOK.unschedule(namespace, pack)
            schedule_start(kube, namespace, pack, settings, settings.retry_delay)

    BOOK.schedule(namespace, pack, delay, fire)


def start(kube: Kube, namespace: str, pack: str, settings: Settings) -> None:
    """Create the pack's Job, every member an owner (nothing when it exists or has no member)."""
    with BOOK.lock(namespace):
        BOOK.unschedule(namespace, pack)
        view = BOOK.pack(namespace, pack)
        founder = BOOK.founder(namespace, pack)
        if view is None or view.job_created or view.closed or not view.active or founder is None:
            return
        parsed, founder_name = founder
        owners = [{"metadata": {"name": m.name, "uid": m.uid}} for m in view.members.values()]
        manifest = pack_children.job(parsed, founder_name, pack, namespace, settings,
                                     pack_children.owner_references(owners))
        try:
            job = kube.create(manifest)
        except ApiError as err:
            if err.status != 409:
                raise
            job = kube.get("batch/v1", "Job", namespace, pack)  # created before a restart
        BOOK.job_created(namespace, pack, job)


# ---- members leave ---------------------------------------------------------------------------------


def leave(kube: Kube, namespace: str, name: str, settings: Settings) -> None:
    """A deleted member leaves its pack: its file goes from the ConfigMap (the trainer cancels its
    slot) and its name from the Role. The garbage collector drops its owner references."""
    with BOOK.lock(namespace):
        pack = BOOK.forget_member(namespace, name)
        view = BOOK.pack(namespace, pack) if pack else None
        if view is None:
            return
        if not view.members:
            BOOK.close(namespace, pack)  # the last one: the garbage collector removes the pack
            return
        ensure_objects(kube, namespace, pack, {}, [], settings, remove=[name])


# ---- a member's phase --------------------------------------------------------------------------------

RELEASED = "released"


def pack_pods(kube: Kube, namespace: str, pack: str) -> list[dict]:
    return kube.list("v1", "Pod", namespace, {names.LABEL_PACK: pack, names.LABEL_APP: names.TRAINER_APP})


def _release_patch(status_: dict, pack: str) -> dict:
    message = f"pack {pack} ended before its trainer took this job up; it joins another pack"
    now = lifecycle.now_iso()
    conds = lifecycle.phase_conditions(list(status_.get("conditions") or []), Phase.queued.value,
                                       pack_lifecycle.PACK_ENDED, message, now)
    # Kept through the next pack: a member released twice fails instead (sync_member).
    conds = lifecycle.set_condition(conds, pack_lifecycle.PACK_ENDED, "True", pack_lifecycle.PACK_ENDED, message, now)
    # Its time in the ended pack is no start of its own: the next pack's Job gives it a startTime.
    return {"phase": Phase.queued.value, "jobName": None, "pack": None, "startTime": None, "attempts": None,
            "conditions": conds}


def sync_member(kube: Kube, namespace: str, name: str, pack: str, job: Optional[dict], pods: list[dict],
                settings: Settings, events: Optional[list[dict]] = None,
                limits: Optional[lifecycle.StartLimits] = None) -> Optional[dict]:
    """Bring one member's phase in line with its report and its pack's Job. Returns the member
    (with its new status) when it was released to be packed again, else None."""
    seen: dict[str, Any] = {}

    def compute(fresh: dict) -> Optional[dict]:
        st = fresh.get("status") or {}
        if st.get("phase") in lifecycle.TERMINAL or (st.get("pack") or {}).get("job") != pack:
            return None
        obs = pack_lifecycle.observe_member(pack, job, pods, st, events, limits)
        if obs is None and pack_lifecycle.released_before(st):
            # A second pack ended without its trainer taking the member up: the trainer refuses it
            # without a word in its status (see <output>/<name>/result.json), so do not loop.
            obs = Observation(Phase.failed.value, pack_lifecycle.NEVER_TRAINED,
                              f"pack {pack} ended without its trainer taking this job up, as an earlier pack did; "
                              "the trainer's reason is in the job's result.json and the pack's log",
                              completion_time=lifecycle.now_iso())
        seen["obs"] = obs
        if obs is None:
            return _release_patch(st, pack)
        patch = lifecycle.lifecycle_patch(st, obs)
        if patch and "phase" in patch:
            view = BOOK.pack(namespace, pack)
            members = sorted(view.members) if view is not None else (st.get("pack") or {}).get("members", [])
            patch["pack"] = {**st["pack"], "members": members}
        return patch

    before, patch = status.update(kube, namespace, name, compute)
    if not patch or before is None:
        return None
    obs = seen.get("obs")
    if obs is None:  # released
        BOOK.forget_member(namespace, name)
        status.event(before, warning=False, reason=pack_lifecycle.PACK_ENDED,
                     message=f"pack {pack} ended before its trainer took this job up; it joins another pack")
        return {**before, "status": {**(before.get("status") or {}), **patch, "jobName": None, "pack": None}}
    status.transition_event(before, patch, obs.reason, obs.message)
    if patch.get("phase") in lifecycle.TERMINAL:
        BOOK.finish_member(namespace, name)
        view = BOOK.pack(namespace, pack)
        sharing = max(len(view.active) + 1, 1) if view is not None else 1
        pack_metrics.record_member_completion(before, patch, obs.reason, sharing)
    if obs.delete_job and job is not None:
        # The pod can never start but would keep its node's GPU: remove the Job.
        kube.delete("batch/v1", "Job", namespace, job["metadata"]["name"])
    return None


def sync_pack(kube: Kube, namespace: str, pack: str, job: Optional[dict], settings: Settings,
              pods: Optional[list[dict]] = None, events: Optional[list[dict]] = None,
              limits: Optional[lifecycle.StartLimits] = None) -> list[dict]:
    """Every unfinished member of the pack; returns the members released to be packed again."""
    view = BOOK.pack(namespace, pack)
    if view is None:
        return []
    ended = job is None or lifecycle.job_condition(job, "Complete") or lifecycle.job_condition(job, "Failed")
    if ended:
        BOOK.close(namespace, pack)
    if pods is None:
        pods = pack_pods(kube, namespace, pack) if lifecycle.job_condition(job, "Failed") else []
    released = []
    for member in view.members.values():
        if not member.active:
            continue
        again = sync_member(kube, namespace, member.name, pack, job, pods, settings, events, limits)
        if again is not None:
            released.append(again)
    if ended:
        pack_metrics.record_pack_end(namespace, pack, job)
    return released


def member_reported(kube: Kube, body: dict, settings: Settings) -> None:
    """The trainer patched a member's status: its run may have ended while the pack goes on."""
    namespace, name, _ = _meta(body)
    st = body.get("status") or {}
    pack = (st.get("pack") or {}).get("job")
    if not pack or st.get("phase") in lifecycle.TERMINAL:
        return
    status.remember(body)  # the copy status writes start from: it holds the report
    if pack_lifecycle.report_reason(st) in (*pack_lifecycle.FINISHED, api.StopReason.failed.value):
        sync_member(kube, namespace, name, pack, BOOK.job(namespace, pack), [], settings)


# ---- after a restart -----------------------------------------------------------------------------------


def resume_member(kube: Kube, body: dict, parsed: api.PersonalizationJob, settings: Settings) -> None:
    """The operator (re)started and finds a member of a pack: it must be in the pack's objects and
    the pack's Job must exist once it is due. Nothing is created twice: every object's name
    comes from the pack's."""
    namespace, name, _ = _meta(body)
    st = body.get("status") or {}
    pack = st["pack"]["job"]
    with BOOK.lock(namespace):
        BOOK.set_founder(namespace, pack, parsed, name)
        view = BOOK.pack(namespace, pack) or PackView(pack)
        if view.job_finished:
            return  # the Job's end is the pack Job watch's business
        if not view.job_created and (st.get("startTime") or st.get("progress")):
            return  # it ran and its Job is gone: the pump's resync reports it (JobLost)
        stale = [m for m in config_members(BOOK.recall(namespace, pack, "ConfigMap") or
                                           kube.get("v1", "ConfigMap", namespace, names.config_map_name(pack)) or {})
                 if m not in view.members]
        config = ensure_objects(kube, namespace, pack, {name: parsed}, [body], settings, remove=stale)
        if config is not None and BOOK.recall(namespace, pack, "Role") is None:
            # A crash between the ConfigMap's patch and the Role's: read the Role once per pack.
            BOOK.remember(namespace, pack, kube.get(*ROLE, namespace, names.trainer_account_name(pack)))
            _set_role(kube, namespace, pack, config, settings)
        if view.job_created:
            _own_job(kube, namespace, pack, [body])
        else:
            schedule_start(kube, namespace, pack, settings, _remaining_wait(namespace, pack, settings))


def _remaining_wait(namespace: str, pack: str, settings: Settings) -> float:
    config = BOOK.recall(namespace, pack, "ConfigMap") or {}
    created = lifecycle.parse_time(config.get("metadata", {}).get("creationTimestamp"))
    if created is None:
        return 0.0
    elapsed = (datetime.datetime.now(datetime.timezone.utc) - created).total_seconds()
    return max(settings.packing_wait_seconds - elapsed, 0.0)


def is_packed(body: dict) -> bool:
    return bool(((body.get("status") or {}).get("pack") or {}).get("job"))

