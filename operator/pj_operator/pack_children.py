"""Manifests of a pack's objects, as plain dicts (pure functions).

A pack has the objects a solo job has, named after the pack: a ConfigMap holding one manifest per
member (`<member>.yaml`, the trainer's --jobs folder), a ServiceAccount, a Role naming exactly
its members, a RoleBinding and the Job. Every member owns the ConfigMap and the Job; the
ServiceAccount, Role and RoleBinding are owned by the ConfigMap, so the garbage collector
removes the whole pack with its last member.

The pod is the solo pod of the founding member (`children.job`) with the pack's command, config
volume, identity and labels: every field it takes from that member is one the compatibility key
(packing.py) makes equal for all members.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Mapping, Optional

import yaml

from personalize import spec as api

from . import children, names, packing
from .children import Manifest
from .settings import Settings

JOBS_DIR = f"{names.CONFIG_DIR}/jobs"  # the pack's ConfigMap, the trainer's --jobs folder


def labels(pack: str) -> dict[str, str]:
    return {names.LABEL_MANAGED_BY: names.OPERATOR_NAME, names.LABEL_INSTANCE: pack, names.LABEL_PACK: pack}


def member_file(job: api.PersonalizationJob, name: str, namespace: str) -> str:
    """The member's manifest as the trainer reads it (the solo job.yaml)."""
    return yaml.safe_dump(children.trainer_manifest(job, name, namespace), sort_keys=False)


def owner_references(members: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every member owns the object; none is its controller (a pack has no single owner)."""
    return [{"apiVersion": names.PJ_API_VERSION, "kind": api.KIND, "name": m["metadata"]["name"],
             "uid": m["metadata"]["uid"], "controller": False, "blockOwnerDeletion": True}
            for m in members]


def config_map(pack: str, namespace: str, files: Mapping[str, str], owners: list[dict[str, Any]]) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": names.config_map_name(pack), "namespace": namespace, "labels": labels(pack),
                     "ownerReferences": owners},
        "data": {packing.config_key(name): text for name, text in sorted(files.items())},
    }


def _owned_by_config(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"apiVersion": "v1", "kind": "ConfigMap", "name": config["metadata"]["name"],
             "uid": config["metadata"]["uid"], "controller": True, "blockOwnerDeletion": False}]


def _meta(name: str, pack: str, namespace: str, config: Mapping[str, Any]) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": labels(pack), "ownerReferences": _owned_by_config(config)}


def service_account(pack: str, namespace: str, config: Mapping[str, Any],
                    annotations: Optional[Mapping[str, str]] = None) -> Manifest:
    meta = _meta(names.trainer_account_name(pack), pack, namespace, config)
    if annotations:
        meta["annotations"] = dict(annotations)
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta}


def role_rules(members: Iterable[str]) -> list[dict[str, Any]]:
    """Read each member, patch each member's status: exactly these resources. An empty list of
    resourceNames would grant every PersonalizationJob of the namespace, so it is refused."""
    allowed = sorted(members)
    if not allowed:
        raise ValueError("a pack's Role must name at least one member")
    return [
        {"apiGroups": [api.API_GROUP], "resources": [api.PLURAL], "resourceNames": allowed, "verbs": ["get"]},
        {"apiGroups": [api.API_GROUP], "resources": [f"{api.PLURAL}/status"], "resourceNames": allowed,
         "verbs": ["get", "patch"]},
    ]


def role(pack: str, namespace: str, config: Mapping[str, Any], members: Iterable[str]) -> Manifest:
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": _meta(names.trainer_account_name(pack), pack, namespace, config),
            "rules": role_rules(members)}


def role_binding(pack: str, namespace: str, config: Mapping[str, Any], account: Optional[str] = None) -> Manifest:
    role_name = names.trainer_account_name(pack)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(role_name, pack, namespace, config),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role_name},
        "subjects": [{"kind": "ServiceAccount", "name": account or role_name, "namespace": namespace}],
    }


def own_account(spec: api.PersonalizationJobSpec) -> Optional[str]:
    """The members' own ServiceAccount (spec.serviceAccountName, equal for all), if they name one."""
    return getattr(spec, "service_account_name", None)


def support(pack: str, namespace: str, config: Mapping[str, Any], founder: api.PersonalizationJob,
            members: Iterable[str], settings: Settings) -> list[Manifest]:
    """What the pod needs besides its ConfigMap, in creation order."""
    account = own_account(founder.spec)
    annotations = getattr(settings, "trainer_service_account_annotations", None)
    return [
        *([] if account else [service_account(pack, namespace, config, annotations)]),
        role(pack, namespace, config, members),
        role_binding(pack, namespace, config, account),
    ]


def _seconds(value: float) -> str:
    return f"{value:g}"


def command(founder: api.PersonalizationJobSpec, settings: Settings) -> list[str]:
    return [
        "personalize-train", "pack",
        "--jobs", JOBS_DIR,
        "--output", packing.output_root(founder),
        "--metrics-port", str(settings.trainer_metrics_port),
        # After its last member finished, the trainer waits this long for a new one (see Settings).
        "--idle-exit", _seconds(settings.packing_idle_exit_seconds),
        "--max-slots", str(settings.packing_max_slots),
        # A member that left stays on /metrics this long, as a solo trainer's final values do.
        "--metrics-linger", _seconds(settings.trainer_metrics_linger_seconds),
    ]


def job(founder: api.PersonalizationJob, founder_name: str, pack: str, namespace: str, settings: Settings,
        owners: list[dict[str, Any]]) -> Manifest:
    """The pack's Job: the founder's solo Job with the pack's command, ConfigMap, identity and labels."""
    manifest = copy.deepcopy(children.job(founder, founder_name, namespace, settings))
    manifest["metadata"] = {"name": pack, "namespace": namespace, "labels": labels(pack), "ownerReferences": owners}
    if founder.spec.queue_name:
        manifest["metadata"]["labels"][names.KUEUE_QUEUE_LABEL] = founder.spec.queue_name
    template = manifest["spec"]["template"]
    template["metadata"]["labels"] = {**labels(pack), names.LABEL_APP: names.TRAINER_APP}
    pod = template["spec"]
    pod["serviceAccountName"] = own_account(founder.spec) or names.trainer_account_name(pack)
    for volume in pod["volumes"]:
        if volume["name"] == "config":
            volume["configMap"] = {"name": names.config_map_name(pack)}
    container = pod["containers"][0]
    container["command"] = command(founder.spec, settings)
    # The members' names come from their manifests; the namespace is the same for all.
    container["env"] = [e for e in container["env"] if e["name"] != "PJ_NAME"]
    for mount in container["volumeMounts"]:
        if mount["name"] == "config":
            mount["mountPath"] = JOBS_DIR
    return manifest
