"""The pure manifest builders (no cluster): what the trainer pod gets."""

from __future__ import annotations

import yaml

from fake_apiserver import validate_builtin
from fake_cluster import pj_manifest
from pj_operator import children, names
from pj_operator.settings import Settings
from pj_operator.validation import validate_job

# Kueue on and any image: these tests build children, the admission policy has its own tests.
SETTINGS = Settings(trainer_image="example.org/trainer:1", kueue_enabled=True, allowed_image_prefixes=())


def parsed(**overrides):
    checked = validate_job(pj_manifest("cat", "team-a", **overrides), SETTINGS)
    assert checked.ok, checked.problems
    return checked.job


def build_job(**overrides):
    return children.job(parsed(**overrides), "cat", "team-a", SETTINGS)


def test_every_child_is_a_valid_kubernetes_object():
    for manifest in children.all_children(parsed(queueName="q"), "cat", "team-a", SETTINGS):
        validate_builtin(manifest)


def test_job_runs_the_trainer_contract():
    job = build_job()
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "example.org/trainer:1"
    assert container["command"] == ["personalize-train", "--config", "/etc/personalization/job.yaml",
                                    "--output", "/output/runs/cat", "--metrics-port", "8000",
                                    "--metrics-linger", "30"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["PJ_NAMESPACE"] == "team-a" and env["PJ_NAME"] == "cat"
    assert container["ports"] == [{"name": "metrics", "containerPort": 8000, "protocol": "TCP"}]
    assert pod["serviceAccountName"] == "cat-trainer"
    assert pod["restartPolicy"] == "Never"


def test_several_gpus_run_one_data_parallel_process_each():
    command = build_job(resources={"gpus": 4})["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--num-processes") + 1] == "4"
    assert "--num-processes" not in build_job(resources={"gpus": 1})["spec"]["template"]["spec"]["containers"][0]["command"]


def test_metrics_linger_is_an_operator_setting_below_the_grace_period():
    settings = Settings.from_env({"PJ_TRAINER_METRICS_LINGER_SECONDS": "2.5"})
    pod = children.job(parsed(), "cat", "team-a", settings)["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command[command.index("--metrics-linger") + 1] == "2.5"
    assert pod["terminationGracePeriodSeconds"] > settings.trainer_metrics_linger_seconds


def test_job_resources_scheduling_and_retries():
    job = build_job(image="example.org/custom:2")
    spec = job["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "example.org/custom:2"
    assert container["resources"]["limits"] == {"memory": "16Gi", "nvidia.com/gpu": "1"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "A100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"], spec["ttlSecondsAfterFinished"]) == (2, 7200, 86400)
    assert "suspend" not in spec
    cpu_job = build_job(resources={"gpus": 0, "cpu": "2", "priorityClassName": "batch-low"})
    cpu_pod = cpu_job["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in cpu_pod["containers"][0]["resources"]["limits"]
    assert cpu_pod["containers"][0]["resources"]["requests"]["cpu"] == "2"
    assert cpu_pod["priorityClassName"] == "batch-low"


def test_operator_default_resources_apply_only_when_the_job_sets_none():
    settings = Settings(default_cpu="8", default_memory="32Gi")
    job = children.job(parsed(), "cat", "team-a", settings)
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"] == {"cpu": "8", "memory": "32Gi",
                                                                                   "ephemeral-storage": "50Gi"}
    job = children.job(parsed(resources={"memory": "4Gi"}), "cat", "team-a", settings)
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"] == {"cpu": "8", "memory": "4Gi",
                                                                                   "ephemeral-storage": "50Gi"}


def test_pod_is_locked_down_with_writable_scratch_only():
    pod = build_job()["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = pod["containers"][0]["securityContext"]
    assert sc == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                  "capabilities": {"drop": ["ALL"]}}
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in ("/tmp", "/cache", "/dev/shm"):
        assert "emptyDir" in volumes[mounts[path]["name"]]
    assert mounts["/etc/personalization"]["readOnly"] is True
    assert volumes[mounts["/output"]["name"]]["persistentVolumeClaim"] == {"claimName": "artifacts"}
    assert mounts["/mnt/concept-images"]["readOnly"] is True


def test_labels_for_podmonitor_and_kueue():
    job = build_job(queueName="gpu-queue")
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"][names.KUEUE_QUEUE_LABEL] == "gpu-queue"
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "personalization-trainer"
    assert labels["personalization.dvar.dev/job"] == "cat"
    assert labels["personalization.dvar.dev/method"] == "textualInversion"


def test_config_map_holds_the_manifest_with_paths_resolved_to_mounts():
    cm = children.config_map(parsed(), "cat", "team-a")
    manifest = yaml.safe_load(cm["data"]["job.yaml"])
    assert manifest["metadata"] == {"name": "cat", "namespace": "team-a"}
    assert manifest["spec"]["concept"]["images"] == {"path": "/mnt/concept-images/concept"}
    assert manifest["spec"]["training"]["maxSteps"] == 400
    # The trainer can load it with the shared model.
    from personalize.spec import parse_job
    assert parse_job(manifest).spec.concept.images.path == "/mnt/concept-images/concept"


def test_trainer_role_reaches_only_its_own_resource():
    role = children.role("cat", "team-a")
    for rule in role["rules"]:
        assert rule["resourceNames"] == ["cat"]
        assert "patch" not in rule["verbs"] or rule["resources"] == ["personalizationjobs/status"]
    binding = children.role_binding("cat", "team-a")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "cat-trainer", "namespace": "team-a"}]


def _pod(settings, **overrides):
    return children.job(parsed(**overrides), "cat", "team-a", settings)["spec"]["template"]["spec"]


HUB_MODEL = {"hubId": "org/sd", "revision": "v1", "secretRef": {"name": "hub-token"}}


def test_hub_jobs_mount_the_shared_cache_claim_read_write_as_hf_home():
    settings = Settings.from_env({"PJ_HUB_CACHE_CLAIM": "hf-cache", "PJ_TRAINER_IMAGE": "example.org/trainer:1"})
    pod = _pod(settings, baseModel=HUB_MODEL)
    validate_builtin(children.job(parsed(baseModel=HUB_MODEL), "cat", "team-a", settings))
    (container,) = pod["containers"]
    volume = next(v for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == "hf-cache")
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount == {"name": volume["name"], "mountPath": names.HUB_CACHE_MOUNT}  # not readOnly: jobs download
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["HF_HOME"] == names.HUB_CACHE_MOUNT
    assert container["envFrom"] == [{"secretRef": {"name": "hub-token"}}]  # HF_TOKEN comes from the Secret


def test_jobs_without_a_hub_id_or_without_the_setting_keep_hf_home_on_scratch():
    with_claim = Settings.from_env({"PJ_HUB_CACHE_CLAIM": "hf-cache"})
    for settings, overrides in ((with_claim, {}), (SETTINGS, {"baseModel": HUB_MODEL})):
        pod = _pod(settings, **overrides)
        env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
        assert env["HF_HOME"] == names.SCRATCH_HF_HOME
        assert all(v.get("persistentVolumeClaim", {}).get("claimName") != "hf-cache" for v in pod["volumes"])


def test_object_store_sources_reach_the_pod_only_as_uri_and_secret_references():
    spec = {"concept": {"images": {"uri": "s3://photos/cat/", "secretRef": {"name": "s3-creds"}}, "classNoun": "dog"},
            "output": {"uri": "gs://results/cat", "secretRef": {"name": "gcs-creds"}}}
    job = children.job(parsed(**spec), "cat", "team-a", SETTINGS)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}, {"secretRef": {"name": "gcs-creds"}}]
    # No volume for a URI source; the output is the pod's emptyDir (checkpoints are mirrored to the URI).
    assert {"name": "output", "emptyDir": {}} in pod["volumes"]
    assert not any("persistentVolumeClaim" in v for v in pod["volumes"])
    manifest = yaml.safe_load(children.config_map(parsed(**spec), "cat", "team-a")["data"]["job.yaml"])
    assert manifest["spec"]["concept"]["images"] == spec["concept"]["images"]
    assert manifest["spec"]["output"]["uri"] == "gs://results/cat"
