"""The trainer pod's identity: the per-job ServiceAccount (with the annotations the chart gives
every one of them, e.g. IRSA's role ARN), or an existing ServiceAccount the job names
(spec.serviceAccountName) to which the operator then binds the job's Role instead."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fake_cluster import condition, pj_manifest, status_of, wait_for
from pj_operator import children, names
from pj_operator.settings import Settings
from pj_operator.validation import validate_job

DOC = Path(__file__).resolve().parents[2] / "docs" / "bad-input.md"
ROLE_ARN = "arn:aws:iam::111122223333:role/trainer-s3"
IRSA = {"eks.amazonaws.com/role-arn": ROLE_ARN}


def service_account(name: str, namespace: str = "default", **annotations: str) -> dict:
    meta = {"name": name, "namespace": namespace}
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta}


def operator_creations(cluster, plural: str) -> list[dict]:
    return [r.data for r in cluster.operator_requests()
            if r.action is not None and r.action.name == "CREATE" and r.resource is not None
            and r.resource.plural == plural]


def test_a_job_naming_its_own_service_account_runs_as_it_and_the_role_is_bound_to_it(cluster, run_operator):
    cluster.create(service_account("s3-reader", **IRSA))
    with run_operator(PJ_TRAINER_SERVICE_ACCOUNT_ANNOTATIONS=json.dumps({"example.com/ignored": "x"})):
        cluster.create(pj_manifest("own", serviceAccountName="s3-reader"))
        job = wait_for(lambda: cluster.job("own"))
        binding = wait_for(lambda: cluster.get("rbac.authorization.k8s.io/v1", "RoleBinding", "default", "own-trainer"))
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "s3-reader"
    assert pod["automountServiceAccountToken"] is True  # the trainer patches its status with the token
    assert operator_creations(cluster, "serviceaccounts") == []
    assert cluster.get("v1", "ServiceAccount", "default", "own-trainer") is None
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "s3-reader", "namespace": "default"}]
    assert binding["roleRef"]["name"] == "own-trainer"
    assert cluster.get("rbac.authorization.k8s.io/v1", "Role", "default", "own-trainer")["rules"] == \
        children.role("own", "default")["rules"]
    # The user's account is theirs: untouched, and not owned (deleting the job keeps it).
    account = cluster.get("v1", "ServiceAccount", "default", "s3-reader")
    assert account["metadata"].get("annotations") == IRSA
    assert not account["metadata"].get("ownerReferences")


def test_the_operators_annotations_reach_every_per_job_service_account(cluster, run_operator):
    with run_operator(PJ_TRAINER_SERVICE_ACCOUNT_ANNOTATIONS=json.dumps(IRSA)):
        for name in ("first", "second"):
            cluster.create(pj_manifest(name))
        for name in ("first", "second"):
            job = wait_for(lambda: cluster.job(name))
            account = cluster.get("v1", "ServiceAccount", "default", f"{name}-trainer")
            assert account["metadata"]["annotations"] == IRSA
            assert job["spec"]["template"]["spec"]["serviceAccountName"] == f"{name}-trainer"
            binding = cluster.get("rbac.authorization.k8s.io/v1", "RoleBinding", "default", f"{name}-trainer")
            assert binding["subjects"][0]["name"] == f"{name}-trainer"
    assert sorted(a["metadata"]["name"] for a in operator_creations(cluster, "serviceaccounts")) == \
        ["first-trainer", "second-trainer"]


def test_without_annotations_the_per_job_account_has_none():
    manifests = children.all_children(validate_job(pj_manifest("cat"), Settings()).job, "cat", "default", Settings())
    (account,) = [m for m in manifests if m["kind"] == "ServiceAccount"]
    assert "annotations" not in account["metadata"]
    assert account["metadata"]["name"] == names.trainer_account_name("cat")


def test_a_service_account_that_does_not_exist_fails_the_job_with_the_controllers_message(cluster, run_operator):
    # What the Job controller reports when the pod's ServiceAccount is missing (Kubernetes' wording).
    refusal = ('pods "lost-x7k2p" is forbidden: error looking up service account default/nobody: '
               'serviceaccount "nobody" not found')
    with run_operator(PJ_START_FAILURE_GRACE_SECONDS="0"):
        cluster.create(pj_manifest("lost", serviceAccountName="nobody"))
        wait_for(lambda: cluster.job("lost"))
        cluster.job_failed_create("lost", refusal)
        status = wait_for(lambda: status_of(cluster, "lost").get("phase") == "Failed" and status_of(cluster, "lost"))
        wait_for(lambda: cluster.job("lost") is None, what="the Job's deletion (it can never start)")
    failed = condition(status, "Failed")
    assert failed["reason"] == "FailedCreate"
    assert failed["message"] == f"Job lost: FailedCreate: {refusal}"
    assert operator_creations(cluster, "serviceaccounts") == []
    # docs/bad-input.md says so in row C1.
    (row,) = [line for line in DOC.read_text().splitlines() if line.startswith("| C1 |")]
    assert '"serviceAccountName": "nobody"' in row and "`FailedCreate`: `Job <name>: FailedCreate: " in row
    assert refusal.replace("lost-x7k2p", "<name>-...").replace("default/", "<namespace>/") in row


def test_annotations_in_the_environment_are_a_json_object_of_strings():
    assert Settings.from_env({"PJ_TRAINER_SERVICE_ACCOUNT_ANNOTATIONS": json.dumps(IRSA)}) \
        .trainer_service_account_annotations == IRSA
    assert Settings.from_env({"PJ_TRAINER_SERVICE_ACCOUNT_ANNOTATIONS": ""}).trainer_service_account_annotations == {}


@pytest.mark.parametrize("bad", ["eks.amazonaws.com/role-arn=arn", '["a"]', '{"a": 1}'])
def test_annotations_that_are_not_a_json_object_of_strings_are_refused(bad):
    with pytest.raises(ValueError, match="PJ_TRAINER_SERVICE_ACCOUNT_ANNOTATIONS must be a JSON object of strings"):
        Settings.from_env({"PJ_TRAINER_SERVICE_ACCOUNT_ANNOTATIONS": bad})
