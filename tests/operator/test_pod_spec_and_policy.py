"""The trainer pod a real cluster needs (pull secrets, deadlines, storage, scheduling pass-through)
and the admission policy the operator enforces on specs (images, priority classes, Secrets)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from fake_apiserver import validate_builtin
from fake_cluster import condition, pj_manifest, status_of, wait_for
from pj_operator import children
from pj_operator.settings import Settings
from pj_operator.validation import validate_job
from personalize.spec import TrainerReport

ROOT = Path(__file__).resolve().parents[2]


def build(settings=Settings(), **overrides):
    checked = validate_job(pj_manifest("cat", "team-a", **overrides), settings)
    assert checked.ok, checked.problems
    job = children.job(checked.job, "cat", "team-a", settings)
    validate_builtin(job)
    return job


def pod_of(job):
    return job["spec"]["template"]["spec"]


# ---- the pod spec ------------------------------------------------------------------------------------


def test_image_pull_secrets_come_from_the_settings_and_the_job():
    settings = Settings.from_env({"PJ_TRAINER_IMAGE_PULL_SECRETS": "registry-a, registry-b"})
    pod = pod_of(build(settings, imagePullSecrets=["team-registry", "registry-a"]))
    assert pod["imagePullSecrets"] == [{"name": "registry-a"}, {"name": "registry-b"}, {"name": "team-registry"}]
    assert "imagePullSecrets" not in pod_of(build())


def test_jobs_get_a_default_active_deadline_unless_they_set_one():
    assert build(Settings.from_env({"PJ_DEFAULT_ACTIVE_DEADLINE_SECONDS": "3600"}),
                 activeDeadlineSeconds=None)["spec"]["activeDeadlineSeconds"] == 3600
    assert build(activeDeadlineSeconds=60)["spec"]["activeDeadlineSeconds"] == 60
    assert build(activeDeadlineSeconds=None)["spec"]["activeDeadlineSeconds"] == Settings().default_active_deadline_seconds
    no_default = Settings.from_env({"PJ_DEFAULT_ACTIVE_DEADLINE_SECONDS": "0"})
    assert "activeDeadlineSeconds" not in build(no_default, activeDeadlineSeconds=None)["spec"]


def test_volumes_are_not_chowned_at_every_start_and_the_cache_is_requested():
    pod = pod_of(build())
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    (container,) = pod["containers"]
    cache = next(v for v in pod["volumes"] if v["name"] == "cache")
    assert container["resources"]["requests"]["ephemeral-storage"] == cache["emptyDir"]["sizeLimit"]


def test_affinity_and_pod_annotations_pass_through():
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu.memory", "operator": "Gt", "values": ["40000"]}]}]}}}
    job = build(resources={"gpus": 1, "affinity": affinity},
                podAnnotations={"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"})
    assert pod_of(job)["affinity"] == affinity
    assert job["spec"]["template"]["metadata"]["annotations"] == {
        "cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}


def test_bad_pod_annotations_are_an_invalid_spec():
    checked = validate_job(pj_manifest("cat", podAnnotations={"not a key!": "x"}), Settings())
    assert any(p.startswith("spec.podAnnotations") for p in checked.problems)


def test_the_trainer_uid_default_is_the_images_user():
    dockerfile = (ROOT / "Dockerfile").read_text()
    trainer_stage = dockerfile[dockerfile.index("AS trainer"):]
    image_uid = int(re.search(r"^USER (\d+)", trainer_stage, re.M).group(1))
    assert Settings().trainer_uid == image_uid
    assert pod_of(build())["securityContext"]["runAsUser"] == image_uid


def test_status_values_are_finite_or_null():
    report = TrainerReport.model_validate({"deterministicLoss": math.nan, "trainLoss": math.inf,
                                           "earlyStop": {"value": -math.inf, "step": 3}})
    api = report.to_api()
    assert api["deterministicLoss"] is None and api["trainLoss"] is None and api["earlyStop"]["value"] is None
    assert api["earlyStop"]["step"] == 3


# ---- the admission policy ------------------------------------------------------------------------------


def problems(settings, **overrides):
    return validate_job(pj_manifest("cat", "team-a", **overrides), settings).problems


def test_only_allowed_image_prefixes_may_be_chosen():
    settings = Settings.from_env({"PJ_ALLOWED_IMAGE_PREFIXES": "registry.example.com/ml/,ghcr.io/dvar-dev/"})
    assert problems(settings, image="registry.example.com/ml/trainer:2") == []
    (problem,) = problems(settings, image="docker.io/evil/miner:latest")
    assert problem.startswith("spec.image:") and "registry.example.com/ml/" in problem
    # A prefix is a prefix of the repository, not of any string: no "registry.example.com/ml.evil".
    assert problems(settings, image="registry.example.com/ml.evil/x:1")
    for any_image in ("", "*"):
        assert problems(Settings.from_env({"PJ_ALLOWED_IMAGE_PREFIXES": any_image}), image="docker.io/anything:1") == []


def test_by_default_only_the_trainer_repository_may_be_chosen():
    """As the chart's default (admission.allowedImagePrefixes: []): any tag of the trainer image."""
    settings = Settings.from_env({"PJ_TRAINER_IMAGE": "registry.example.com/ml/trainer:1.0"})
    assert settings.allowed_image_prefixes == ("registry.example.com/ml/trainer",)
    assert problems(settings, image="registry.example.com/ml/trainer:1.1-cuda") == []
    assert problems(settings, image="registry.example.com/ml/trainer@sha256:" + "0" * 64) == []
    assert problems(settings, image="registry.example.com/ml/other:1")
    assert problems(Settings(), image="docker.io/anything:1")
    assert Settings(trainer_image="localhost:5000/trainer@sha256:abc").allowed_image_prefixes == ("localhost:5000/trainer",)


def test_only_allowed_priority_classes_may_be_chosen_and_system_classes_never():
    res = pj_manifest("x")["spec"]["resources"]
    settings = Settings.from_env({"PJ_ALLOWED_PRIORITY_CLASSES": "batch-low,batch-high"})
    assert problems(settings, resources=dict(res, priorityClassName="batch-high")) == []
    (problem,) = problems(settings, resources=dict(res, priorityClassName="urgent"))
    assert problem.startswith("spec.resources.priorityClassName:") and "batch-low, batch-high" in problem
    for system in ("system-cluster-critical", "system-node-critical"):
        assert problems(Settings(), resources=dict(res, priorityClassName=system))


def test_env_from_names_only_the_secrets_the_job_references():
    job = build(baseModel={"hubId": "org/model", "secretRef": {"name": "hf-token"}},
                output={"path": "x", "claimName": "artifacts", "uri": "s3://bucket/runs", "secretRef": {"name": "s3"}})
    (container,) = pod_of(job)["containers"]
    assert [e["secretRef"]["name"] for e in container["envFrom"]] == ["hf-token", "s3"]
    assert all(set(e) == {"secretRef"} for e in container["envFrom"])


def test_a_refused_image_is_an_invalid_spec_on_the_resource(cluster, run_operator):
    with run_operator(PJ_ALLOWED_IMAGE_PREFIXES="ghcr.io/dvar-dev/"):
        cluster.create(pj_manifest("rogue", image="docker.io/evil/miner:latest"))
        status = wait_for(lambda: status_of(cluster, "rogue").get("phase") == "Failed" and status_of(cluster, "rogue"))
        assert condition(status, "Valid")["reason"] == "InvalidSpec"
        assert "spec.image" in condition(status, "Valid")["message"]
        assert cluster.creations("jobs") == []


@pytest.mark.parametrize("value", ["-1", "abc"])
def test_bad_durations_in_the_environment_are_refused(value):
    with pytest.raises(ValueError):
        Settings.from_env({"PJ_PENDING_DEADLINE_SECONDS": value})
