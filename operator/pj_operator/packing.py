"""Which PersonalizationJobs may share a pod, and which pack a job joins. Pure.

A pack is one trainer Job (`personalize-train pack`) whose pod trains several concepts at once.
Two jobs may share it only when everything the pod is built from (image, volumes, secrets,
resources, placement, Job policy) and everything the trainer's shared model is built from (base
model, precision, resolution) is the same: `compatibility_key` hashes exactly those fields. The
hash is part of every pack's name, so the pack a job may join is found by name alone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Iterable, Optional

from personalize import spec as api

from . import children
from .settings import Settings

# Methods whose trained weights are the concept's own (a token, an adapter, Custom Diffusion's
# attention weights): several can train against one frozen base model. DreamBooth and
# TI->DreamBooth change the shared weights.
PACKABLE_METHODS = (api.Method.textual_inversion, api.Method.lora, api.Method.custom_diffusion)

PACK_PREFIX = "pack-"
KEY_LENGTH = 10  # hex characters of the key in a pack's name


def unpackable_reason(spec: api.PersonalizationJobSpec, name: str, settings: Settings) -> Optional[str]:
    """Why the job runs in a pod of its own, or None when it may share one."""
    if not settings.packing_enabled:
        return "packing is turned off in this operator (PJ_PACKING_ENABLED)"
    if spec.packing == api.Packing.never:
        return "spec.packing is never"
    if spec.method not in PACKABLE_METHODS:
        return f"method {spec.method.value} changes the shared model"
    if spec.resources.gpus != 1:
        return f"it asks for {spec.resources.gpus} GPUs (a pack has one)"
    if spec.output.claim_name and PurePosixPath(spec.output.path).name != name:
        # A pack writes member NAME to <output>/NAME: only a path ending in the job's name keeps
        # the artifacts where the spec says they go.
        return f"spec.output.path {spec.output.path!r} does not end in the job's name"
    return None


def output_root(spec: api.PersonalizationJobSpec) -> str:
    """The pack's --output: the folder whose NAME/ subfolder is the member's spec.output.path."""
    if not spec.output.claim_name:
        return children.output_dir(spec)
    return str(PurePosixPath(children.output_dir(spec)).parent)


def _pod_fields(spec: api.PersonalizationJobSpec, settings: Settings) -> dict:
    """What the pack's pod and Job are built from (so every member gets what it asked for)."""
    resources = spec.resources
    return {
        "image": spec.image or settings.trainer_image,
        "imagePullSecrets": sorted(spec.image_pull_secrets),
        "serviceAccountName": getattr(spec, "service_account_name", None),
        "secrets": sorted(children.secret_refs(spec)),
        "claims": [spec.base_model.claim_name, spec.concept.images.claim_name, spec.output.claim_name],
        "output": output_root(spec),
        "cpu": resources.cpu or settings.default_cpu,
        "memory": resources.memory or settings.default_memory,
        "nodeSelector": dict(sorted(resources.node_selector.items())),
        "tolerations": [t.to_api() for t in resources.tolerations],
        "priorityClassName": resources.priority_class_name,
        "affinity": resources.affinity,
        "queueName": spec.queue_name,
        "podAnnotations": dict(sorted(spec.pod_annotations.items())),
        "backoffLimit": spec.backoff_limit,
        "activeDeadlineSeconds": spec.active_deadline_seconds,
        "ttlSecondsAfterFinished": spec.ttl_seconds_after_finished,
    }


def _model_fields(spec: api.PersonalizationJobSpec) -> dict:
    """What the trainer's one copy of the base model is built from (its family follows the model)."""
    base = spec.base_model.to_api()
    base.pop("secretRef", None)  # in the pod fields already
    return {"baseModel": base, "mixedPrecision": spec.training.mixed_precision.value,
            "resolution": spec.training.resolution}


def compatibility_key(spec: api.PersonalizationJobSpec, settings: Settings) -> str:
    """Equal for two jobs of one namespace exactly when they may share a pack."""
    fields = {"pod": _pod_fields(spec, settings), "model": _model_fields(spec)}
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


def pack_name(key: str, founder_uid: str) -> str:
    """`pack-<key>-<8 hex of the founding member's uid>`: the same on every attempt (a retried
    creation finds its own objects), unique per founder, and the key readable from the name."""
    return f"{PACK_PREFIX}{key}-{hashlib.sha256(founder_uid.encode()).hexdigest()[:8]}"


def key_of(pack: str) -> str:
    return pack[len(PACK_PREFIX):len(PACK_PREFIX) + KEY_LENGTH]


def config_key(member: str) -> str:
    """The member's file in the pack's --jobs folder (its ConfigMap key)."""
    return f"{member}.yaml"


def member_of(config_key_: str) -> Optional[str]:
    return config_key_[:-len(".yaml")] if config_key_.endswith(".yaml") else None


# ---- choosing a pack -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    name: str
    uid: str
    slot: int
    active: bool  # not Succeeded or Failed: it holds its slot
    output_uri: Optional[str] = None


@dataclass
class PackView:
    """A pack as the operator knows it: its members, and its Job's state."""
    name: str
    members: dict[str, Member] = field(default_factory=dict)
    job_created: bool = False
    job_finished: bool = False  # Complete, Failed or deleted: the trainer is gone
    closed: bool = False  # the operator has finished its members (or is doing so)

    @property
    def active(self) -> list[Member]:
        return [m for m in self.members.values() if m.active]

    def free_slot(self, max_slots: int) -> Optional[int]:
        """The lowest slot no active member holds, or None when the pack is full (also after the
        operator restarted with a smaller PJ_PACKING_MAX_SLOTS)."""
        if len(self.active) >= max_slots:
            return None
        held = {m.slot for m in self.active}
        return next((slot for slot in range(max_slots) if slot not in held), None)

    def open_to(self, output_uri: Optional[str], max_slots: int) -> bool:
        """May a job with this output URI join now?

        Not once the Job has ended or every member has finished (its trainer then exits after
        --idle-exit seconds: a joiner could miss it); not with a member that writes the same URI."""
        if self.job_finished or self.closed or self.free_slot(max_slots) is None:
            return False
        if self.job_created and not self.active:
            return False
        return not (output_uri and any(m.output_uri == output_uri for m in self.members.values()))


def choose(packs: Iterable[PackView], key: str, output_uri: Optional[str], max_slots: int) -> Optional[PackView]:
    """The open pack of this key to join: the fullest (fewer pods), then the oldest name."""
    open_ = [p for p in packs if key_of(p.name) == key and p.open_to(output_uri, max_slots)]
    if not open_:
        return None
    return min(open_, key=lambda p: (-len(p.active), p.name))
