"""Names and labels shared by the children builders, the handlers and the tests."""

from __future__ import annotations

from personalize import spec as api

from .settings import OPERATOR_NAME

PJ_API_VERSION = f"{api.API_GROUP}/{api.API_VERSION}"

LABEL_APP = "app.kubernetes.io/name"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_JOB = f"{api.API_GROUP}/job"
LABEL_METHOD = f"{api.API_GROUP}/method"
LABEL_PACK = f"{api.API_GROUP}/pack"  # on a pack's objects and pod: the pack's name
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

TRAINER_APP = "personalization-trainer"
METRICS_PORT_NAME = "metrics"  # the number is a setting (PJ_TRAINER_METRICS_PORT)

# The trainer's container and its exit codes (personalize.run / personalize.shutdown).
TRAINER_CONTAINER = "trainer"
EXIT_BAD_INPUT = 2  # the spec, images, model or a checkpoint are unusable: retrying cannot help
EXIT_INTERRUPTED = 143  # SIGTERM, after a checkpoint: a replacement pod resumes from it
# The run finished and wrote its artifacts and result, but its final status patch failed: the
# result is in the termination message (personalize.status_reporter.EXIT_STATUS_UNREPORTED).
EXIT_STATUS_UNREPORTED = 3
TERMINATION_LOG = "/dev/termination-log"

CONFIG_KEY = "job.yaml"
CONFIG_DIR = "/etc/personalization"
OUTPUT_DIR = "/output"
BASE_MODEL_MOUNT = "/mnt/base-model"
IMAGES_MOUNT = "/mnt/concept-images"
HUB_CACHE_MOUNT = "/mnt/hf-home"  # the shared Hugging Face cache PVC (HF_HOME), when configured
SCRATCH_HF_HOME = "/cache/huggingface"  # HF_HOME on the pod's scratch cache otherwise


def job_name(pj_name: str) -> str:
    # The PersonalizationJob name is at most 63 characters (validated), so is the Job's.
    return pj_name


def config_map_name(pj_name: str) -> str:
    return f"{pj_name}-config"


def trainer_account_name(pj_name: str) -> str:
    """ServiceAccount, Role and RoleBinding share this name (the Role and RoleBinding keep it when
    the job runs as its own spec.serviceAccountName)."""
    return f"{pj_name}-trainer"


def child_labels(pj_name: str) -> dict[str, str]:
    """Labels on every child; the operator's Job watch selects on LABEL_MANAGED_BY."""
    return {LABEL_MANAGED_BY: OPERATOR_NAME, LABEL_INSTANCE: pj_name, LABEL_JOB: pj_name}


def pod_labels(pj_name: str, method: str) -> dict[str, str]:
    """Labels a PodMonitor selects trainer pods by (see docs/operator.md)."""
    return {**child_labels(pj_name), LABEL_APP: TRAINER_APP, LABEL_METHOD: method}
