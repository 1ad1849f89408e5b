"""Manifests of the objects a PersonalizationJob owns, as plain dicts (pure functions).

Owner references are added by the caller (`kopf.adopt`), so these builders need only the
parsed job, its name/namespace and the operator settings, and are easy to test.

Volume layout of the trainer pod (docs/operator.md):
  /etc/personalization/job.yaml   the manifest (ConfigMap key `job.yaml`), read-only
  /output                         the output PVC (spec.output.claimName) or an emptyDir
  /mnt/base-model, /mnt/concept-images   input PVCs, read-only, when claimName is set
  /mnt/hf-home                    the shared Hugging Face cache PVC (HF_HOME, read-write), for hubId jobs
                                  when the operator has one (PJ_HUB_CACHE_CLAIM)
  /tmp, /cache, /dev/shm          emptyDirs (the root filesystem is read-only)
Paths of PVC-backed inputs are rewritten in the ConfigMap copy of the manifest to where the
pod mounts them, so the trainer never needs to know about volumes.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import yaml

from personalize import spec as api

from . import names
from .names import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_STATUS_UNREPORTED, PJ_API_VERSION, TERMINATION_LOG
from .names import TRAINER_CONTAINER as CONTAINER
from .settings import Settings

Manifest = dict[str, Any]


def _meta(name: str, namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": dict(labels)}


def trainer_manifest(job: api.PersonalizationJob, name: str, namespace: str) -> dict[str, Any]:
    """The manifest the trainer reads: the spec with defaults spelled out and input paths resolved."""
    spec = job.spec.to_api()
    base = spec["baseModel"]
    if base.get("claimName") and base.get("path"):
        base["path"] = f"{names.BASE_MODEL_MOUNT}/{base['path']}".rstrip("/")
        del base["claimName"]
    images = spec["concept"]["images"]
    if images.get("claimName") and images.get("path"):
        images["path"] = f"{names.IMAGES_MOUNT}/{images['path']}".rstrip("/")
        del images["claimName"]
    return {
        "apiVersion": PJ_API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def config_map(job: api.PersonalizationJob, name: str, namespace: str) -> Manifest:
    text = yaml.safe_dump(trainer_manifest(job, name, namespace), sort_keys=False)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(names.config_map_name(name), namespace, names.child_labels(name)),
        "data": {names.CONFIG_KEY: text},
    }


def trainer_account(spec: api.PersonalizationJobSpec, name: str) -> str:
    """The ServiceAccount the trainer pod runs as: the job's own (spec.serviceAccountName, for a
    cloud workload identity bound to it) or the one made for the job."""
    return spec.service_account_name or names.trainer_account_name(name)


def service_account(name: str, namespace: str, annotations: Optional[Mapping[str, str]] = None) -> Manifest:
    """The per-job ServiceAccount; `annotations` (PJ_TRAINER_SERVICE_ACCOUNT_ANNOTATIONS) bind a
    cloud identity to every such account, e.g. eks.amazonaws.com/role-arn for IRSA."""
    meta = _meta(names.trainer_account_name(name), namespace, names.child_labels(name))
    if annotations:
        meta["annotations"] = dict(annotations)
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta}


def role(name: str, namespace: str) -> Manifest:
    """The trainer may read its own resource and patch its own status, nothing else."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(names.trainer_account_name(name), namespace, names.child_labels(name)),
        "rules": [
            {
                "apiGroups": [api.API_GROUP],
                "resources": [api.PLURAL],
                "resourceNames": [name],
                "verbs": ["get"],
            },
            {
                "apiGroups": [api.API_GROUP],
                "resources": [f"{api.PLURAL}/status"],
                "resourceNames": [name],
                "verbs": ["get", "patch"],
            },
        ],
    }


def role_binding(name: str, namespace: str, account: Optional[str] = None) -> Manifest:
    """Binds the job's Role to `account` (default: the per-job ServiceAccount)."""
    role_name = names.trainer_account_name(name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(role_name, namespace, names.child_labels(name)),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role_name},
        "subjects": [{"kind": "ServiceAccount", "name": account or role_name, "namespace": namespace}],
    }


def _volumes(spec: api.PersonalizationJobSpec, name: str, settings: Settings) -> tuple[list, list]:
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": names.config_map_name(name)}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "cache", "emptyDir": {"sizeLimit": settings.cache_size_limit}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size_limit}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": names.CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": "/cache"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    # One volume per distinct claim; the same claim may be mounted at several paths.
    claim_volumes: dict[str, str] = {}

    def claim_volume(claim: str) -> str:
        if claim not in claim_volumes:
            claim_volumes[claim] = f"claim-{len(claim_volumes)}"
            volumes.append({"name": claim_volumes[claim], "persistentVolumeClaim": {"claimName": claim}})
        return claim_volumes[claim]

    if spec.output.claim_name:
        mounts.append({"name": claim_volume(spec.output.claim_name), "mountPath": names.OUTPUT_DIR})
    else:
        volumes.append({"name": "output", "emptyDir": {}})
        mounts.append({"name": "output", "mountPath": names.OUTPUT_DIR})
    if spec.base_model.claim_name:
        mounts.append({"name": claim_volume(spec.base_model.claim_name), "mountPath": names.BASE_MODEL_MOUNT,
                       "readOnly": True})
    if spec.concept.images.claim_name:
        mounts.append({"name": claim_volume(spec.concept.images.claim_name), "mountPath": names.IMAGES_MOUNT,
                       "readOnly": True})
    if hub_cache_claim(spec, settings):  # read-write: the job downloads into it
        mounts.append({"name": claim_volume(settings.hub_cache_claim), "mountPath": names.HUB_CACHE_MOUNT})
    return volumes, mounts


def hub_cache_claim(spec: api.PersonalizationJobSpec, settings: Settings) -> str:
    """The shared Hugging Face cache PVC this job mounts ("" for none: no hubId or not configured)."""
    return settings.hub_cache_claim if spec.base_model.hub_id else ""


def output_dir(spec: api.PersonalizationJobSpec) -> str:
    if spec.output.claim_name:
        return f"{names.OUTPUT_DIR}/{spec.output.path}".rstrip("/")
    return names.OUTPUT_DIR


def _resources(spec: api.PersonalizationJobSpec, settings: Settings) -> dict[str, Any]:
    res = spec.resources
    cpu = res.cpu or settings.default_cpu
    memory = res.memory or settings.default_memory
    requests = {"cpu": cpu, "memory": memory}
    # The model cache is an emptyDir on the node's disk: request its size so the scheduler only
    # picks nodes with room for it (the kubelet evicts a pod whose emptyDir outgrows the node).
    # /dev/shm is memory-backed and counts against the memory limit below.
    storage = settings.cache_size_limit if settings.ephemeral_storage_request is None \
        else settings.ephemeral_storage_request
    if storage:
        requests["ephemeral-storage"] = storage
    limits = {"memory": memory}  # no CPU limit: throttling a data loader only slows the GPU down
    if res.gpus:
        limits[settings.gpu_resource] = str(res.gpus)
    return {"requests": requests, "limits": limits}




def pod_failure_policy() -> dict[str, Any]:
    """How the Job controller counts a failed trainer pod (first matching rule wins).

    Every rule lists both `onExitCodes`/`onPodConditions` keys: Kubernetes 1.28's schema
    requires `onPodConditions` (an empty list is allowed next to `onExitCodes`).
    """
    exit_code = lambda action, code: {  # noqa: E731
        "action": action,
        "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [code]},
        "onPodConditions": [],
    }
    return {"rules": [
        # Preempted or evicted (the pod carries the DisruptionTarget condition): not the job's
        # fault, so it does not use up backoffLimit; the replacement resumes from the checkpoint.
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        # Bad input fails the Job at once: the same input would fail the same way again.
        exit_code("FailJob", EXIT_BAD_INPUT),
        # The run finished and kept its artifacts, but its final status patch failed: rerunning
        # would train again for nothing. The operator reads the result from the termination message.
        exit_code("FailJob", EXIT_STATUS_UNREPORTED),
        # Any other SIGTERM (exit 143 after a checkpoint) is a retry that counts.
        exit_code("Count", EXIT_INTERRUPTED),
    ]}


def secret_refs(spec: api.PersonalizationJobSpec) -> list[str]:
    """Names of the Secrets the spec references, deduplicated, in spec order."""
    refs = [spec.base_model.secret_ref, spec.concept.images.secret_ref, spec.output.secret_ref]
    return list(dict.fromkeys(ref.name for ref in refs if ref is not None))


def image_pull_secrets(spec: api.PersonalizationJobSpec, settings: Settings) -> list[dict[str, str]]:
    """The operator's pull secrets, then the job's own, deduplicated."""
    secrets = dict.fromkeys(settings.trainer_image_pull_secrets + tuple(spec.image_pull_secrets))
    return [{"name": secret} for secret in secrets]


def _scheduling(spec: api.PersonalizationJobSpec, settings: Settings) -> dict[str, Any]:
    """Pod-spec fields that only place or pull the pod, each present only when set."""
    res = spec.resources
    fields: dict[str, Any] = {
        "nodeSelector": dict(res.node_selector),
        "tolerations": [t.to_api() for t in res.tolerations],
        "priorityClassName": res.priority_class_name,
        "affinity": res.affinity,
        "imagePullSecrets": image_pull_secrets(spec, settings),
    }
    return {key: value for key, value in fields.items() if value}


def _seconds(value: float) -> str:
    """`30.0` -> "30", `2.5` -> "2.5" (as a user would write it on the command line)."""
    return f"{value:g}"


def job(job: api.PersonalizationJob, name: str, namespace: str, settings: Settings) -> Manifest:
    spec = job.spec
    method = spec.method.value
    volumes, mounts = _volumes(spec, name, settings)
    container = {
        "name": CONTAINER,
        "image": spec.image or settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": [
            "personalize-train",
            "--config", f"{names.CONFIG_DIR}/{names.CONFIG_KEY}",
            "--output", output_dir(spec),
            "--metrics-port", str(settings.trainer_metrics_port),
            # Keep /metrics up after the final values so a scrape sees the early-stop decision.
            "--metrics-linger", _seconds(settings.trainer_metrics_linger_seconds),
            # one data-parallel process per GPU of the pod
            *(["--num-processes", str(spec.resources.gpus)] if spec.resources.gpus > 1 else []),
        ],
        "env": [
            {"name": "PJ_NAMESPACE", "value": namespace},
            {"name": "PJ_NAME", "value": name},
            {"name": "HOME", "value": "/tmp"},
            {"name": "XDG_CACHE_HOME", "value": "/cache"},
            {"name": "HF_HOME",
             "value": names.HUB_CACHE_MOUNT if hub_cache_claim(spec, settings) else names.SCRATCH_HF_HOME},
            {"name": "TORCH_HOME", "value": "/cache/torch"},
            {"name": "MPLCONFIGDIR", "value": "/tmp/matplotlib"},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ],
        "ports": [{"name": names.METRICS_PORT_NAME, "containerPort": settings.trainer_metrics_port,
                   "protocol": "TCP"}],
        "resources": _resources(spec, settings),
        "volumeMounts": mounts,
        # The trainer writes its final result (compact JSON, < 4096 bytes) here, so the operator
        # can recover the decision if the status patch was lost; on a crash, the log tail instead.
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    secrets = secret_refs(spec)
    if secrets:
        # Credentials only by reference: the kubelet resolves the Secret; its values never pass
        # through the operator, the spec, the ConfigMap or the status.
        container["envFrom"] = [{"secretRef": {"name": secret}} for secret in secrets]
    pod_spec: dict[str, Any] = {
        # Never: a failed attempt becomes a new pod, which backoffLimit counts and we can inspect
        # (podFailurePolicy requires it, too).
        "restartPolicy": "Never",
        # SIGTERM -> SIGKILL: time for the trainer's SIGTERM checkpoint.
        "terminationGracePeriodSeconds": settings.termination_grace_period_seconds,
        "serviceAccountName": trainer_account(spec, name),
        # The trainer patches its status with this token: mounted even when the job's own
        # ServiceAccount turns automounting off.
        "automountServiceAccountToken": True,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.trainer_uid,
            "runAsGroup": settings.trainer_uid,
            "fsGroup": settings.trainer_uid,
            # Chown a volume only when its root does not belong to fsGroup yet: a recursive chown
            # of a model PVC with millions of files would otherwise delay every start.
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
        **_scheduling(spec, settings),
    }
    pod_meta: dict[str, Any] = {"labels": names.pod_labels(name, method)}
    if spec.pod_annotations:
        pod_meta["annotations"] = dict(spec.pod_annotations)

    labels = names.child_labels(name)
    job_spec: dict[str, Any] = {
        "backoffLimit": spec.backoff_limit,
        "completions": 1,
        "parallelism": 1,
        "podFailurePolicy": pod_failure_policy(),
        # The replacement pod starts only when the old one has finished (written its checkpoint).
        "podReplacementPolicy": "Failed",
        "template": {"metadata": pod_meta, "spec": pod_spec},
    }
    deadline = spec.active_deadline_seconds or settings.default_active_deadline_seconds
    if deadline:
        job_spec["activeDeadlineSeconds"] = deadline
    if spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    if spec.queue_name:
        # Kueue admits the workload by unsuspending the Job.
        labels[names.KUEUE_QUEUE_LABEL] = spec.queue_name
        job_spec["suspend"] = True
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(names.job_name(name), namespace, labels),
        "spec": job_spec,
    }


def all_children(parsed: api.PersonalizationJob, name: str, namespace: str, settings: Settings) -> list[Manifest]:
    """In creation order: everything the pod needs exists before the Job that starts it. A job
    with spec.serviceAccountName gets no ServiceAccount: its Role is bound to that one."""
    own_account = parsed.spec.service_account_name
    return [
        config_map(parsed, name, namespace),
        *([] if own_account else [service_account(name, namespace, settings.trainer_service_account_annotations)]),
        role(name, namespace),
        role_binding(name, namespace, own_account),
        job(parsed, name, namespace, settings),
    ]

