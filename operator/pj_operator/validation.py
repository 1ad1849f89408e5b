"""Checks the CRD schema cannot express: run before anything is created.

`validate_job` returns the parsed model or a list of problems, one line each, naming the field.
The pydantic model (personalize.spec) checks types, ranges and cross-field rules; here we add
what would otherwise fail later in a less readable place (the API server rejecting the Job, or
the trainer failing after a GPU was allocated).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from personalize import spec as api

from .crdgen import MAX_NAME_LENGTH
from .names import KUEUE_QUEUE_LABEL
from .settings import Settings

# Kubernetes naming rules (apimachinery validation).
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

# Which optional spec sections belong to which method.
_METHOD_SECTIONS = {
    # Stage 1 of tiDreambooth is a textual inversion: its options apply there too.
    "textualInversion": {api.Method.textual_inversion, api.Method.ti_dreambooth},
    "dreambooth": {api.Method.dreambooth},
    "lora": {api.Method.lora},
    "tiDreambooth": {api.Method.ti_dreambooth},
}


@dataclass
class Validated:
    job: Optional[api.PersonalizationJob] = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.job is not None and not self.problems


def _is_dns_subdomain(value: str) -> bool:
    return len(value) <= 253 and bool(_DNS_SUBDOMAIN.match(value))


def _is_label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if prefix and not _is_dns_subdomain(prefix):
        return False
    return 0 < len(name) <= 63 and bool(_LABEL_NAME.match(name))


def _is_label_value(value: str) -> bool:
    return len(value) <= 63 and bool(_LABEL_VALUE.match(value))


def _check_kubernetes_fields(spec: api.PersonalizationJobSpec) -> list[str]:
    problems = []
    res = spec.resources
    for key, value in res.node_selector.items():
        if not _is_label_key(key):
            problems.append(f"spec.resources.nodeSelector: {key!r} is not a valid label key")
        if not _is_label_value(value):
            problems.append(f"spec.resources.nodeSelector.{key}: {value!r} is not a valid label value")
    for i, tol in enumerate(res.tolerations):
        where = f"spec.resources.tolerations[{i}]"
        if tol.operator == "Exists" and tol.value:
            problems.append(f"{where}: value must be empty when operator is Exists")
        if not tol.key and tol.operator != "Exists":
            problems.append(f"{where}: an empty key requires operator Exists")
        if tol.key and not _is_label_key(tol.key):
            problems.append(f"{where}.key: {tol.key!r} is not a valid label key")
        if tol.toleration_seconds is not None and tol.effect != "NoExecute":
            problems.append(f"{where}: tolerationSeconds only applies to effect NoExecute")
    if res.priority_class_name and not _is_dns_subdomain(res.priority_class_name):
        problems.append(f"spec.resources.priorityClassName: {res.priority_class_name!r} is not a valid name")
    # The three places data comes from or goes to may each name a PVC and a Secret.
    sources = {
        "spec.baseModel": spec.base_model,
        "spec.concept.images": spec.concept.images,
        "spec.output": spec.output,
    }
    for where, source in sources.items():
        if source.claim_name and not _is_dns_subdomain(source.claim_name):
            problems.append(f"{where}.claimName: {source.claim_name!r} is not a valid PersistentVolumeClaim name")
    for where, source in sources.items():
        if source.secret_ref is not None and not _is_dns_subdomain(source.secret_ref.name):
            problems.append(f"{where}.secretRef.name: {source.secret_ref.name!r} is not a valid Secret name")
    if spec.queue_name and not _is_label_value(spec.queue_name):
        problems.append(f"spec.queueName: {spec.queue_name!r} is not a valid label value")
    if spec.service_account_name and not _is_dns_subdomain(spec.service_account_name):
        problems.append(f"spec.serviceAccountName: {spec.service_account_name!r} is not a valid ServiceAccount name")
    for i, secret in enumerate(spec.image_pull_secrets):
        if not _is_dns_subdomain(secret):
            problems.append(f"spec.imagePullSecrets[{i}]: {secret!r} is not a valid Secret name")
    for key in spec.pod_annotations:
        if not _is_label_key(key):  # annotation keys follow the label key syntax
            problems.append(f"spec.podAnnotations: {key!r} is not a valid annotation key")
    return problems


def _image_repository_prefix_ok(image: str, prefix: str) -> bool:
    """`prefix` names a registry, a repository path or a repository: "ghcr.io/org/" allows
    everything under org, "ghcr.io/org/trainer" only that repository (any tag or digest)."""
    if prefix.endswith(("/", ":", "@")):
        return image.startswith(prefix)
    return image == prefix or image.startswith((prefix + ":", prefix + "@", prefix + "/"))


def _check_policy(spec: api.PersonalizationJobSpec, settings: Settings) -> list[str]:
    """The cluster admin's admission policy (operator settings, set through the Helm chart)."""
    problems = []
    allowed_images = settings.allowed_image_prefixes
    if spec.image and allowed_images and not any(_image_repository_prefix_ok(spec.image, p) for p in allowed_images):
        problems.append(f"spec.image: {spec.image!r} is not allowed here; allowed prefixes: "
                        f"{', '.join(allowed_images)}")
    pc = spec.resources.priority_class_name
    allowed_classes = settings.allowed_priority_classes
    if pc and allowed_classes and pc not in allowed_classes:
        problems.append(f"spec.resources.priorityClassName: {pc!r} is not allowed here; allowed: "
                        f"{', '.join(allowed_classes)}")
    elif pc and not allowed_classes and pc.startswith("system-"):
        problems.append(f"spec.resources.priorityClassName: {pc!r} is reserved for cluster-critical pods")
    return problems


def _check_training(spec: api.PersonalizationJobSpec) -> list[str]:
    problems = []
    es = spec.early_stopping
    if spec.training.min_steps > spec.max_steps:
        problems.append(
            f"spec.training.minSteps: {spec.training.min_steps} exceeds the resolved maxSteps "
            f"{spec.max_steps} of method {spec.method.value}"
        )
    if not spec.concept.class_noun:
        for i, prompt in enumerate(spec.validation.prompts):
            if "{class_noun}" in prompt:
                problems.append(f"spec.validation.prompts[{i}]: uses {{class_noun}} but concept.classNoun is not set")
    if es.criterion not in (api.CriterionName.none, api.CriterionName.clip):
        if spec.window >= spec.max_steps:
            problems.append(
                f"spec.earlyStopping.window: {spec.window} steps is not below maxSteps {spec.max_steps}, "
                "so the criterion could never stop early (lower the window or use criterion: none)"
            )
        # only a value the user gave: a window under the default evalEvery is not their mistake
        if "eval_every" in es.model_fields_set and es.eval_every > spec.window:
            problems.append(
                f"spec.earlyStopping.evalEvery: {es.eval_every} is larger than the window ({spec.window} steps)"
            )
    return problems


def _check_method_sections(raw_spec: dict[str, Any], spec: api.PersonalizationJobSpec) -> list[str]:
    problems = []
    for section, methods in _METHOD_SECTIONS.items():
        if section in raw_spec and spec.method not in methods:
            allowed = " or ".join(sorted(m.value for m in methods))
            problems.append(f"spec.{section}: only used by method {allowed}, not by {spec.method.value}")
    return problems


def queue_label(body: dict[str, Any]) -> Optional[str]:
    """The Kueue queue named by the resource's kueue.x-k8s.io/queue-name label, if any."""
    return ((body.get("metadata") or {}).get("labels") or {}).get(KUEUE_QUEUE_LABEL) or None


def parse_body(body: dict[str, Any]) -> api.PersonalizationJob:
    """The API model of a body as the API server sends it (status and server fields left out);
    raises api.SpecError. A kueue.x-k8s.io/queue-name label on the resource is its queueName, as
    Kueue users label the objects they queue (the spec's own queueName wins; validate_job reports
    a disagreement)."""
    job = api.parse_job({k: body[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in body})
    label = queue_label(body)
    if label and not job.spec.queue_name:
        job = job.model_copy(update={"spec": job.spec.model_copy(update={"queue_name": label})})
    return job


def validate_job(body: dict[str, Any], settings: Settings) -> Validated:
    """Parse and check a PersonalizationJob body (as received from the API server)."""
    name = body.get("metadata", {}).get("name", "")
    raw_spec = body.get("spec") or {}
    try:
        job = parse_body(body)
    except api.SpecError as err:
        return Validated(problems=str(err).split("; "))
    problems = []
    if len(name) > MAX_NAME_LENGTH or not _DNS_LABEL.match(name):
        problems.append(f"metadata.name: {name!r} must be a DNS label of at most {MAX_NAME_LENGTH} characters")
    problems += _check_kubernetes_fields(job.spec)
    problems += _check_training(job.spec)
    problems += _check_method_sections(raw_spec, job.spec)
    problems += _check_policy(job.spec, settings)
    label, own = queue_label(body), raw_spec.get("queueName")
    queue_field = "spec.queueName" if own else f"metadata.labels[{KUEUE_QUEUE_LABEL!r}]"
    if label and own and label != own:
        problems.append(f"{queue_field}: {own!r} differs from the label {KUEUE_QUEUE_LABEL}={label!r}; "
                        "name one queue")
    if job.spec.queue_name and not settings.kueue_enabled:
        problems.append(f"{queue_field}: Kueue integration is disabled in this operator (PJ_KUEUE_ENABLED); "
                        "the chart value operator.kueue.enabled turns it on")
    return Validated(job=job, problems=problems)
