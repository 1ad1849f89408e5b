"""Security of what the operator creates: the trainer pod is locked down, the
trainer's Role reaches only its own resource, and credentials travel only by Secret reference."""

from __future__ import annotations

import base64
import itertools
import json
import logging

import pytest
from prometheus_client import REGISTRY, generate_latest

from fake_cluster import pj_manifest, status_of, wait_for
from pj_operator import children
from pj_operator.settings import Settings
from pj_operator.validation import validate_job
from rbac_eval import Request, allows, rule_allows

GROUP = "personalization.dvar.dev"
SETTINGS = Settings()


def parsed(name="cat", **overrides):
    checked = validate_job(pj_manifest(name, "team-a", **overrides), SETTINGS)
    assert checked.ok, checked.problems
    return checked.job


# ---- the trainer pod -------------------------------------------------------------------------------


def test_trainer_pod_runs_non_root_read_only_without_privileges():
    pod = children.job(parsed(), "cat", "team-a", SETTINGS)["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0 and psc["runAsGroup"] > 0
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    csc = container["securityContext"]
    assert csc["readOnlyRootFilesystem"] is True
    assert csc["allowPrivilegeEscalation"] is False
    assert csc["capabilities"] == {"drop": ["ALL"]}
    assert csc.get("privileged") is not True and "add" not in csc["capabilities"]
    assert not any(k in pod for k in ("hostNetwork", "hostPID", "hostIPC"))
    assert not any("hostPath" in v for v in pod["volumes"])


def test_every_path_the_trainer_writes_is_a_writable_empty_dir_or_the_output():
    pod = children.job(parsed(), "cat", "team-a", SETTINGS)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = {m["mountPath"] for m in container["volumeMounts"]
                if not m.get("readOnly") and ("emptyDir" in volumes[m["name"]] or m["mountPath"] == "/output")}
    assert {"/tmp", "/cache", "/dev/shm", "/output"} <= writable
    env = {e["name"]: e.get("value") for e in container["env"]}
    for var in ("HOME", "HF_HOME", "TORCH_HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR"):
        assert any(env[var] == root or env[var].startswith(root + "/") for root in writable), var
    # Inputs and the config are mounted read-only.
    read_only = {m["mountPath"] for m in container["volumeMounts"] if m.get("readOnly")}
    assert {"/etc/personalization", "/mnt/concept-images"} <= read_only


# ---- RBAC ---------------------------------------------------------------------------------------


def test_the_rbac_evaluator_follows_kubernetes_rules():
    rule = {"apiGroups": [GROUP], "resources": ["personalizationjobs"], "verbs": ["get"], "resourceNames": ["a"]}
    assert rule_allows(rule, Request("get", GROUP, "personalizationjobs", "a"))
    assert not rule_allows(rule, Request("get", GROUP, "personalizationjobs", "b"))
    assert not rule_allows(rule, Request("list", GROUP, "personalizationjobs"))
    assert not rule_allows(dict(rule, verbs=["list"]), Request("list", GROUP, "personalizationjobs"))  # named
    assert not rule_allows(rule, Request("get", GROUP, "personalizationjobs/status", "a"))  # subresource
    assert not rule_allows(rule, Request("get", "", "personalizationjobs", "a"))  # other group
    anything = {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}
    assert rule_allows(anything, Request("delete", "", "secrets", "x"))
    assert rule_allows(anything, Request("create", "", "pods"))
    assert rule_allows({"apiGroups": [GROUP], "resources": ["personalizationjobs/*"], "verbs": ["patch"]},
                       Request("patch", GROUP, "personalizationjobs/status", "z"))


VERBS = ["get", "list", "watch", "create", "update", "patch", "delete", "deletecollection", "escalate", "bind",
         "impersonate"]
RESOURCES = [(GROUP, "personalizationjobs"), (GROUP, "personalizationjobs/status"),
             (GROUP, "personalizationjobs/scale"), ("", "secrets"), ("", "pods"), ("", "pods/exec"),
             ("", "configmaps"), ("", "serviceaccounts/token"), ("batch", "jobs"),
             ("rbac.authorization.k8s.io", "roles"), ("rbac.authorization.k8s.io", "rolebindings"), ("", "events")]


@pytest.mark.parametrize("name", ["cat", "a-much-longer-name-0123"])
def test_each_jobs_role_allows_only_get_own_resource_and_get_patch_own_status(name):
    role = children.role(name, "team-a")
    allowed = {(r.verb, r.resource, r.name)
               for verb, (group, resource), who in itertools.product(VERBS, RESOURCES, [name, "other", None])
               for r in [Request(verb, group, resource, who)] if allows(role, r)}
    assert allowed == {("get", "personalizationjobs", name), ("get", "personalizationjobs/status", name),
                       ("patch", "personalizationjobs/status", name)}
    binding = children.role_binding(name, "team-a")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{name}-trainer", "namespace": "team-a"}]
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "team-a"


# ---- credentials only by Secret reference ------------------------------------------------------------

SECRET_VALUE = "sEcReT-4f9a1c-DO-NOT-LEAK"

SECRET_SPEC = dict(
    baseModel={"builtin": "tiny-world", "secretRef": {"name": "hub-token"}},
    concept={"images": {"uri": "s3://photos/cat", "secretRef": {"name": "s3-creds"}}, "classNoun": "cat"},
    output={"path": "runs/cat", "claimName": "artifacts", "uri": "s3://artifacts/cat",
            "secretRef": {"name": "s3-creds"}},
)


def test_secret_references_become_env_from_and_nothing_else():
    job = children.job(parsed(**SECRET_SPEC), "cat", "team-a", SETTINGS)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["envFrom"] == [{"secretRef": {"name": "hub-token"}}, {"secretRef": {"name": "s3-creds"}}]
    assert "envFrom" not in children.job(parsed(), "cat", "team-a", SETTINGS)["spec"]["template"]["spec"][
        "containers"][0]


def test_no_secret_value_reaches_status_events_logs_or_metrics(cluster, run_operator, caplog):
    caplog.set_level(logging.DEBUG)
    encoded = base64.b64encode(SECRET_VALUE.encode()).decode()
    for secret in ("hub-token", "s3-creds"):
        # (Posted by path: the operator's client does not even know the Secret kind.)
        cluster.kube.request("POST", "/api/v1/namespaces/default/secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": secret, "namespace": "default"},
            "type": "Opaque", "data": {"AWS_SECRET_ACCESS_KEY": encoded, "HF_TOKEN": encoded}})
    with run_operator(extra_args=("--verbose",)) as runner:
        cluster.create(pj_manifest("private", **SECRET_SPEC))
        cluster.create(pj_manifest("private-bad", backoffLimit=0, **SECRET_SPEC))
        for name in ("private", "private-bad"):
            wait_for(lambda: cluster.job(name))
            cluster.start_pod(name)
            cluster.pod_running(name)
        cluster.trainer_reports("private", {"progress": {"step": 400, "maxSteps": 400, "percent": 100.0},
                                            "earlyStop": {"stopped": False, "reason": "MaxSteps", "step": 400}})
        cluster.job_succeeded("private")
        cluster.pod_failed("private-bad", exit_code=2, message="error: spec.concept.images: no images at uri")
        wait_for(lambda: status_of(cluster, "private").get("phase") == "Succeeded")
        wait_for(lambda: status_of(cluster, "private-bad").get("phase") == "Failed")
        wait_for(lambda: [e for e in cluster.events_for("private-bad") if e["reason"] == "Failed/BadInput"])
        envs = cluster.job("private")["spec"]["template"]["spec"]["containers"][0]["envFrom"]
        assert {e["secretRef"]["name"] for e in envs} == {"hub-token", "s3-creds"}
    places = {
        "status": json.dumps([status_of(cluster, n) for n in ("private", "private-bad")]),
        "events": json.dumps(cluster.list("v1", "Event", "default")),
        "operator log (caplog)": caplog.text,
        "operator log (kopf output)": runner.output,
        "metrics": generate_latest(REGISTRY).decode(),
        "children": json.dumps([o for n in ("private", "private-bad")
                                for o in cluster.owned_by(cluster.pj(n)["metadata"]["uid"])]),
    }
    assert caplog.text and runner.output  # the logs were captured at all
    for where, text in places.items():
        assert SECRET_VALUE not in text and encoded not in text, where
    # The operator never even reads Secrets: the kubelet resolves envFrom.
    assert not [r for r in cluster.operator_requests() if r.resource is not None and r.resource.plural == "secrets"]


def test_credentials_in_a_uri_are_refused_without_repeating_them(cluster, run_operator):
    leaky = pj_manifest("leaky", concept={"images": {"uri": f"s3://AKIAEXAMPLE:{SECRET_VALUE}@photos/cat"},
                                          "classNoun": "cat"})
    with run_operator():
        cluster.create(leaky)
        status = wait_for(lambda: status_of(cluster, "leaky").get("phase") == "Failed" and status_of(cluster, "leaky"))
        valid = next(c for c in status["conditions"] if c["type"] == "Valid")
        assert valid["reason"] == "InvalidSpec" and "secretRef" in valid["message"]
        events = wait_for(lambda: cluster.events_for("leaky"))
    assert SECRET_VALUE not in json.dumps(status) and SECRET_VALUE not in json.dumps(events)
    assert cluster.creations("jobs") == []
