"""A pod with a cloud workload identity reads its concept images from S3 without any Secret.

IRSA (and the EKS Pod Identity webhook in IRSA mode) puts two variables into the pod:
`AWS_ROLE_ARN` and `AWS_WEB_IDENTITY_TOKEN_FILE` (the projected ServiceAccount token). The SDK
trades the token for temporary credentials with STS AssumeRoleWithWebIdentity, then signs the S3
requests with them. Here moto's server plays both STS and S3, and it checks every S3 request's
signature and the assumed role's policy: only the first request after the setup (the STS call,
which the SDK sends unsigned as AWS does) goes unchecked.
"""

from __future__ import annotations

import json
import os
import uuid

import boto3
import pytest
import requests

from personalize.errors import TrainerInputError
from personalize.storage.images import fetch_concept_images
from storage_servers import MotoS3

ACCOUNT = "123456789012"
# The test's own setup (bucket, objects, roles) runs while moto checks nothing.
SETUP = {"aws_access_key_id": "AKIASETUPEXAMPLE0001", "aws_secret_access_key": "setup", "region_name": "us-east-1"}
TRUST = {"Version": "2012-10-17", "Statement": [{
    "Effect": "Allow", "Action": "sts:AssumeRoleWithWebIdentity",
    "Principal": {"Federated": f"arn:aws:iam::{ACCOUNT}:oidc-provider/oidc.eks.example.com/id/CLUSTER"}}]}


@pytest.fixture(scope="module")
def moto():
    # Its own server: the test turns IAM checking on and off on it.
    server = MotoS3()
    yield server
    server.close()


def checked_after(moto: MotoS3, unchecked: float) -> None:
    """From now on, moto checks signatures and policies after `unchecked` more requests."""
    answer = requests.post(f"{moto.endpoint}/moto-api/reset-auth", data=str(unchecked).encode(), timeout=10)
    answer.raise_for_status()


@pytest.fixture
def bucket(moto, concept_dir):
    checked_after(moto, float("inf"))
    name = f"photos-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=moto.endpoint, **SETUP)
    s3.create_bucket(Bucket=name)
    for path in sorted(concept_dir.iterdir()):
        s3.put_object(Bucket=name, Key=f"cat/{path.name}", Body=path.read_bytes())
    return name


def role(moto, name: str, actions: list[str]) -> str:
    iam = boto3.client("iam", endpoint_url=moto.endpoint, **SETUP)
    arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(TRUST))["Role"]["Arn"]
    iam.put_role_policy(RoleName=name, PolicyName="concept-images", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
    return arn


@pytest.fixture
def pod_env(moto, tmp_path, monkeypatch):
    """The trainer pod's environment without any Secret: no keys, no config files, no IMDS."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("PJ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PJ_STORAGE_BACKOFF", "0")
    return monkeypatch


def give_identity(pod_env, tmp_path, role_arn: str) -> None:
    """What the IRSA webhook injects: the role and the projected token's path."""
    token = tmp_path / "eks.amazonaws.com" / "serviceaccount" / "token"
    token.parent.mkdir(parents=True)
    token.write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6dGVhbS1hOmNhdC10cmFpbmVyIn0.c2ln")
    pod_env.setenv("AWS_ROLE_ARN", role_arn)
    pod_env.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token))


def assumed_roles(moto) -> list[dict]:
    state = requests.get(f"{moto.endpoint}/moto-api/data.json", timeout=10).json()
    return state.get("sts", {}).get("AssumedRole", [])


def test_web_identity_credentials_read_the_concept_images_without_a_secret(moto, bucket, pod_env, tmp_path,
                                                                             concept_dir):
    arn = role(moto, "trainer-reads-photos", ["s3:ListBucket", "s3:GetObject"])
    give_identity(pod_env, tmp_path, arn)
    checked_after(moto, 1)  # the SDK's STS call; every S3 request is checked
    folder = fetch_concept_images(f"s3://{bucket}/cat/")
    got = sorted(p.read_bytes() for p in folder.iterdir())
    assert got == sorted(p.read_bytes() for p in concept_dir.iterdir())
    assert [r["role_arn"] for r in assumed_roles(moto)].count(arn) == 1


def test_the_s3_reads_are_signed_with_the_roles_credentials(moto, bucket, pod_env, tmp_path):
    """The same identity with a role that may not read: S3 refuses, so it checked those credentials."""
    give_identity(pod_env, tmp_path, role(moto, "trainer-writes-only", ["s3:PutObject"]))
    checked_after(moto, 1)
    with pytest.raises(TrainerInputError, match=rf"s3://{bucket}: access denied"):
        fetch_concept_images(f"s3://{bucket}/cat/")


def test_without_an_identity_or_a_secret_there_are_no_credentials(moto, bucket, pod_env):
    checked_after(moto, 0)
    with pytest.raises(TrainerInputError, match=r"no credentials \(set secretRef, or give the pod a workload identity\)"):
        fetch_concept_images(f"s3://{bucket}/cat/")
