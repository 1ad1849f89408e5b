"""Operator settings, read once from the environment (the Helm chart sets these variables)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Mapping, Optional

OPERATOR_NAME = "personalization-operator"


def _names(value: str) -> tuple[str, ...]:
    """A comma-separated list, blanks dropped, duplicates dropped (first occurrence kept)."""
    return tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))


def _seconds(name: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"PJ_{name} must be a number of seconds, not {value!r}") from None
    if seconds < 0 or seconds != seconds:
        raise ValueError(f"PJ_{name} must be >= 0")
    return seconds


def _annotations(value: str) -> dict[str, str]:
    """A JSON object of string values (what the chart renders from a map), empty for blank."""
    if not value.strip():
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict) or not all(isinstance(v, str) for v in parsed.values()):
        raise ValueError(f"PJ_TRAINER_SERVICE_ACCOUNT_ANNOTATIONS must be a JSON object of strings, not {value!r}")
    return parsed


def image_repository(image: str) -> str:
    """`registry/path/name:tag` or `...@sha256:...` -> `registry/path/name`."""
    name = image.split("@", 1)[0]
    head, _, tail = name.rpartition("/")
    return f"{head}/{tail.split(':', 1)[0]}" if head else tail.split(":", 1)[0]


def _image_prefixes(value: Optional[str]) -> Optional[tuple[str, ...]]:
    """Unset: None (the trainer image's repository); "" or "*": any image (empty tuple)."""
    if value is None:
        return None
    prefixes = _names(value)
    return () if "*" in prefixes else prefixes


def _bool(value: str) -> bool:
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


@dataclass(frozen=True)
class Settings:
    # Image of the trainer container; a PersonalizationJob may override it with spec.image.
    trainer_image: str = "ghcr.io/dvar-dev/personalization-trainer:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    # Secrets every trainer pod pulls its image with (a private registry); jobs may add their own.
    trainer_image_pull_secrets: tuple[str, ...] = ()
    # Admission policy. spec.image must start with one of these prefixes (empty: any image).
    # None: only the trainer image's own repository (any tag), as the chart's default;
    # PJ_ALLOWED_IMAGE_PREFIXES "" or "*" allows any image.
    allowed_image_prefixes: Optional[tuple[str, ...]] = None
    # spec.resources.priorityClassName must be one of these (empty: any but the system-* classes,
    # which would let a training job preempt cluster-critical pods).
    allowed_priority_classes: tuple[str, ...] = ()
    # At most this many jobs hold a Job at once (0: no cap). Jobs with a Kueue queue are not counted:
    # Kueue admits those. (Every default here equals the chart's default value.)
    max_concurrent_jobs: int = 4
    # Honour spec.queueName and the kueue.x-k8s.io/queue-name label (Kueue installed). When off,
    # a job naming a queue is an invalid spec.
    kueue_enabled: bool = False
    # Used when the job does not set spec.resources.cpu / memory itself.
    default_cpu: str = "4"
    default_memory: str = "16Gi"
    gpu_resource: str = "nvidia.com/gpu"
    # Size limits of the pod's scratch volumes (emptyDir).
    cache_size_limit: str = "50Gi"
    shm_size_limit: str = "8Gi"
    # A PersistentVolumeClaim (in each job's namespace, ReadWriteMany) mounted read-write as HF_HOME
    # into the pods of jobs with baseModel.hubId: the first job downloads a model, later ones reuse
    # it. Empty: HF_HOME is on the pod's scratch cache (downloaded again by every pod).
    hub_cache_claim: str = ""
    # Ephemeral storage the trainer pod requests: the scheduler then only picks nodes with room
    # for the model cache (empty: request nothing). Defaults to the cache's size limit.
    ephemeral_storage_request: Optional[str] = None
    # Non-root identity of the trainer container: the trainer image's user (Dockerfile USER).
    trainer_uid: int = 10001
    # Namespaces to serve; empty: the whole cluster.
    namespaces: tuple[str, ...] = ()
    # How often queued jobs re-check capacity and pending jobs check their pod (seconds). A tick
    # reads what the watches keep (watched.py) and sends no request unless something changes.
    poll_interval: float = 10.0
    # Every this many seconds a tick lists every kind instead: the safety net for an event no
    # watch delivered (an object deleted while a watch was away). One listing per kind (per served
    # namespace), whatever the number of jobs or tenants.
    resync_interval: float = 300.0
    # Back-off before kopf retries a reconcile that the API server refused (quota, webhook...).
    retry_delay: float = 30.0
    # Our API client retries 429/5xx answers and unanswered requests this many times, waiting
    # api_backoff x 2^n seconds; a request without an answer after api_timeout seconds is dropped.
    api_retries: int = 5
    api_backoff: float = 0.5
    api_timeout: float = 30.0
    # The API server ends each watch stream after this long and kopf starts a new one: a stream
    # that silently died (a load balancer dropped it) cannot keep events away for longer.
    watch_timeout: float = 300.0
    # A pod that cannot start: how long before the job fails. Image pulls are often transient
    # (registry rate limits, a blip) and the kubelet retries them; the other causes
    # (CreateContainerConfigError, FailedCreate, FailedAttachVolume) rarely fix themselves.
    image_pull_grace_seconds: float = 300.0
    start_failure_grace_seconds: float = 60.0
    # A job whose pod has not started this long after its Job (or its latest pod) was created
    # fails with PendingDeadlineExceeded and frees its slot (0: wait forever).
    pending_deadline_seconds: float = 3600.0
    # spec.activeDeadlineSeconds when the job sets none (0: no deadline).
    default_active_deadline_seconds: int = 86400
    # Seconds between SIGTERM and SIGKILL for the trainer pod: its SIGTERM checkpoint must fit.
    termination_grace_period_seconds: int = 120
    # The trainer keeps serving /metrics this long after its final values (`--metrics-linger`), so
    # a PodMonitor scrape (typically every 30 s) sees the early-stop decision before the pod ends.
    # A SIGTERM during that linger (a pod deleted right after it finished) does not cut it short,
    # so it must stay below the grace period above. An interrupted run does not linger.
    trainer_metrics_linger_seconds: float = 30.0
    # The trainer's /metrics port (the pod's port named `metrics`). Outside 9100-9999, the range
    # of exporters' default ports: GPU nodes often run DCGM exporter on 9400.
    trainer_metrics_port: int = 8000
    # Annotations of every per-job trainer ServiceAccount, e.g. eks.amazonaws.com/role-arn for
    # IRSA (jobs with spec.serviceAccountName use their own ServiceAccount untouched).
    trainer_service_account_annotations: Mapping[str, str] = field(default_factory=dict)
    # Packing (docs/operator.md, "Packing"): compatible jobs of one namespace train in one pod, up to
    # packing_max_slots at once; a new pack collects members for packing_wait_seconds before its Job
    # is created. The pack's trainer exits packing_idle_exit_seconds after its last member finished
    # with no new one: longer than the kubelet takes to show a ConfigMap change in a running pod
    # (its sync period, 1 minute by default), so a member that joins as the last one finishes is
    # still seen; and longer than a scrape interval, so the last member's final metrics are scraped.
    packing_enabled: bool = True
    packing_max_slots: int = 8
    packing_wait_seconds: float = 30.0
    packing_idle_exit_seconds: float = 120.0
    metrics_port: int = 8080
    health_port: int = 8081
    # Standalone: no kopf peering (one replica; the Deployment uses the Recreate strategy).
    standalone: bool = True

    def __post_init__(self) -> None:
        if self.allowed_image_prefixes is None:
            object.__setattr__(self, "allowed_image_prefixes", (image_repository(self.trainer_image),))

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "Settings":
        env = os.environ if env is None else env
        d = cls()

        def get(name: str, default):
            return env.get(f"PJ_{name}", default)

        namespaces = tuple(ns.strip() for ns in get("NAMESPACES", "").split(",") if ns.strip())
        settings = cls(
            trainer_image=get("TRAINER_IMAGE", d.trainer_image),
            image_pull_policy=get("IMAGE_PULL_POLICY", d.image_pull_policy),
            trainer_image_pull_secrets=_names(get("TRAINER_IMAGE_PULL_SECRETS", "")),
            allowed_image_prefixes=_image_prefixes(get("ALLOWED_IMAGE_PREFIXES", None)),
            allowed_priority_classes=_names(get("ALLOWED_PRIORITY_CLASSES", "")),
            max_concurrent_jobs=int(get("MAX_CONCURRENT_JOBS", d.max_concurrent_jobs)),
            kueue_enabled=_bool(get("KUEUE_ENABLED", str(d.kueue_enabled))),
            default_cpu=get("DEFAULT_CPU", d.default_cpu),
            default_memory=get("DEFAULT_MEMORY", d.default_memory),
            gpu_resource=get("GPU_RESOURCE", d.gpu_resource),
            cache_size_limit=get("CACHE_SIZE_LIMIT", d.cache_size_limit),
            shm_size_limit=get("SHM_SIZE_LIMIT", d.shm_size_limit),
            hub_cache_claim=get("HUB_CACHE_CLAIM", d.hub_cache_claim).strip(),
            ephemeral_storage_request=get("EPHEMERAL_STORAGE_REQUEST", None),
            trainer_uid=int(get("TRAINER_UID", d.trainer_uid)),
            namespaces=namespaces,
            poll_interval=float(get("POLL_INTERVAL", d.poll_interval)),
            resync_interval=_seconds("RESYNC_INTERVAL", get("RESYNC_INTERVAL", str(d.resync_interval))),
            retry_delay=float(get("RETRY_DELAY", d.retry_delay)),
            api_retries=int(get("API_RETRIES", d.api_retries)),
            api_backoff=float(get("API_BACKOFF", d.api_backoff)),
            api_timeout=_seconds("API_TIMEOUT", get("API_TIMEOUT", str(d.api_timeout))),
            watch_timeout=_seconds("WATCH_TIMEOUT", get("WATCH_TIMEOUT", str(d.watch_timeout))),
            image_pull_grace_seconds=_seconds("IMAGE_PULL_GRACE_SECONDS",
                                              get("IMAGE_PULL_GRACE_SECONDS", str(d.image_pull_grace_seconds))),
            start_failure_grace_seconds=_seconds("START_FAILURE_GRACE_SECONDS", get(
                "START_FAILURE_GRACE_SECONDS", str(d.start_failure_grace_seconds))),
            pending_deadline_seconds=_seconds("PENDING_DEADLINE_SECONDS",
                                              get("PENDING_DEADLINE_SECONDS", str(d.pending_deadline_seconds))),
            default_active_deadline_seconds=int(_seconds("DEFAULT_ACTIVE_DEADLINE_SECONDS", get(
                "DEFAULT_ACTIVE_DEADLINE_SECONDS", str(d.default_active_deadline_seconds)))),
            termination_grace_period_seconds=int(get("TERMINATION_GRACE_PERIOD_SECONDS",
                                                     d.termination_grace_period_seconds)),
            trainer_metrics_linger_seconds=float(get("TRAINER_METRICS_LINGER_SECONDS",
                                                     d.trainer_metrics_linger_seconds)),
            trainer_metrics_port=int(get("TRAINER_METRICS_PORT", d.trainer_metrics_port)),
            trainer_service_account_annotations=_annotations(get("TRAINER_SERVICE_ACCOUNT_ANNOTATIONS", "")),
            packing_enabled=_bool(get("PACKING_ENABLED", str(d.packing_enabled))),
            packing_max_slots=int(get("PACKING_MAX_SLOTS", d.packing_max_slots)),
            packing_wait_seconds=_seconds("PACKING_WAIT_SECONDS",
                                          get("PACKING_WAIT_SECONDS", str(d.packing_wait_seconds))),
            packing_idle_exit_seconds=_seconds("PACKING_IDLE_EXIT_SECONDS", get(
                "PACKING_IDLE_EXIT_SECONDS", str(d.packing_idle_exit_seconds))),
            metrics_port=int(get("METRICS_PORT", d.metrics_port)),
            health_port=int(get("HEALTH_PORT", d.health_port)),
            standalone=_bool(get("STANDALONE", str(d.standalone))),
        )
        if not 0 < settings.trainer_metrics_port < 65536:
            raise ValueError("PJ_TRAINER_METRICS_PORT must be a TCP port number (1-65535)")
        if settings.max_concurrent_jobs < 0:
            raise ValueError("PJ_MAX_CONCURRENT_JOBS must be >= 0")
        if settings.api_retries < 0 or settings.api_backoff < 0:
            raise ValueError("PJ_API_RETRIES and PJ_API_BACKOFF must be >= 0")
        if settings.termination_grace_period_seconds < 0:
            raise ValueError("PJ_TERMINATION_GRACE_PERIOD_SECONDS must be >= 0")
        if settings.trainer_metrics_linger_seconds < 0:
            raise ValueError("PJ_TRAINER_METRICS_LINGER_SECONDS must be >= 0")
        if settings.trainer_metrics_linger_seconds and (
            settings.trainer_metrics_linger_seconds >= settings.termination_grace_period_seconds
        ):
            raise ValueError(
                "PJ_TRAINER_METRICS_LINGER_SECONDS must be below PJ_TERMINATION_GRACE_PERIOD_SECONDS "
                "(a SIGTERM does not cut a finished trainer's linger short)"
            )
        if settings.api_timeout <= 0 or settings.watch_timeout < 1:
            raise ValueError("PJ_API_TIMEOUT must be > 0 and PJ_WATCH_TIMEOUT >= 1")
        if not 1 <= settings.packing_max_slots <= 64:
            raise ValueError("PJ_PACKING_MAX_SLOTS must be between 1 and 64")
        if settings.poll_interval <= 0:
            raise ValueError("PJ_POLL_INTERVAL must be > 0")
        if settings.resync_interval <= 0:
            raise ValueError("PJ_RESYNC_INTERVAL must be > 0")
        return settings
