"""Operator settings, read once from the environment (the Helm chart sets these variables)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

OPERATOR_NAME = "personalization-operator"


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
    # At most this many jobs hold a Job at once (0: no cap). Jobs with a Kueue queue are not counted:
    # Kueue admits those.
    max_concurrent_jobs: int = 0
    # Honour spec.queueName (Kueue installed). When off, a queueName is an invalid spec.
    kueue_enabled: bool = True
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
    # Non-root identity of the trainer container.
    trainer_uid: int = 1000
    # Namespaces to serve; empty: the whole cluster.
    namespaces: tuple[str, ...] = ()
    # How often queued jobs re-check capacity and pending jobs check their pod (seconds).
    poll_interval: float = 10.0
    # Back-off before kopf retries a reconcile that the API server refused (quota, webhook...).
    retry_delay: float = 30.0
    # Our API client retries 429/5xx answers this many times, waiting api_backoff x 2^n seconds.
    api_retries: int = 5
    api_backoff: float = 0.5
    # Seconds between SIGTERM and SIGKILL for the trainer pod: its SIGTERM checkpoint must fit.
    termination_grace_period_seconds: int = 120
    # The trainer keeps serving /metrics this long after its final values (`--metrics-linger`), so
    # a PodMonitor scrape (typically every 30 s) sees the early-stop decision before the pod ends.
    # A SIGTERM during that linger (a pod deleted right after it finished) does not cut it short,
    # so it must stay below the grace period above. An interrupted run does not linger.
    trainer_metrics_linger_seconds: float = 30.0
    metrics_port: int = 8080
    health_port: int = 8081
    # Standalone: no kopf peering (one replica; the Deployment uses the Recreate strategy).
    standalone: bool = True

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
            max_concurrent_jobs=int(get("MAX_CONCURRENT_JOBS", d.max_concurrent_jobs)),
            kueue_enabled=_bool(get("KUEUE_ENABLED", str(d.kueue_enabled))),
            default_cpu=get("DEFAULT_CPU", d.default_cpu),
            default_memory=get("DEFAULT_MEMORY", d.default_memory),
            gpu_resource=get("GPU_RESOURCE", d.gpu_resource),
            cache_size_limit=get("CACHE_SIZE_LIMIT", d.cache_size_limit),
            shm_size_limit=get("SHM_SIZE_LIMIT", d.shm_size_limit),
            hub_cache_claim=get("HUB_CACHE_CLAIM", d.hub_cache_claim).strip(),
            trainer_uid=int(get("TRAINER_UID", d.trainer_uid)),
            namespaces=namespaces,
            poll_interval=float(get("POLL_INTERVAL", d.poll_interval)),
            retry_delay=float(get("RETRY_DELAY", d.retry_delay)),
            api_retries=int(get("API_RETRIES", d.api_retries)),
            api_backoff=float(get("API_BACKOFF", d.api_backoff)),
            termination_grace_period_seconds=int(get("TERMINATION_GRACE_PERIOD_SECONDS",
                                                     d.termination_grace_period_seconds)),
            trainer_metrics_linger_seconds=float(get("TRAINER_METRICS_LINGER_SECONDS",
                                                     d.trainer_metrics_linger_seconds)),
            metrics_port=int(get("METRICS_PORT", d.metrics_port)),
            health_port=int(get("HEALTH_PORT", d.health_port)),
            standalone=_bool(get("STANDALONE", str(d.standalone))),
        )
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
        if settings.poll_interval <= 0:
            raise ValueError("PJ_POLL_INTERVAL must be > 0")
        return settings
