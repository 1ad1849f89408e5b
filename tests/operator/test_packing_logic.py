"""The packing rules as pure functions: which jobs may share a pod, which pack a job joins."""

from __future__ import annotations

import pytest

from fake_cluster import pj_manifest
from personalize import spec as api
from pj_operator import pack_children, packing
from pj_operator.packing import Member, PackView
from pj_operator.settings import Settings

SETTINGS = Settings()


def parsed(name="c", **spec):
    return api.parse_job(pj_manifest(name, **spec))


def key(name="c", **spec):
    return packing.compatibility_key(parsed(name, **spec).spec, SETTINGS)


@pytest.mark.parametrize("change", [
    dict(image="ghcr.io/dvar-dev/personalization-trainer:0.2.0"),
    dict(baseModel={"hubId": "runwayml/stable-diffusion-v1-5"}),
    dict(baseModel={"hubId": "runwayml/stable-diffusion-v1-5", "revision": "fp16"}),
    dict(training={"maxSteps": 400, "mixedPrecision": "bf16"}),
    dict(training={"maxSteps": 400, "resolution": 256}),
    dict(resources={"gpus": 1, "nodeSelector": {"pool": "b"}}),
    dict(resources={"gpus": 1, "nodeSelector": {"nvidia.com/gpu.product": "A100"}}),  # no toleration
    dict(resources={"gpus": 1, "priorityClassName": "urgent"}),
    dict(resources={"gpus": 1, "memory": "64Gi"}),
    dict(queueName="gpu-queue"),
    dict(imagePullSecrets=["registry"]),
    dict(podAnnotations={"team": "a"}),
    dict(backoffLimit=0),
    dict(activeDeadlineSeconds=60),
    dict(concept={"images": {"path": "concept", "claimName": "other-images"}, "classNoun": "dog"}),
    dict(output={"path": "elsewhere/c", "claimName": "artifacts"}),
    dict(output={"path": "runs/c", "claimName": "artifacts", "uri": "s3://b/c/", "secretRef": {"name": "s3"}}),
], ids=lambda c: next(iter(c)))
def test_a_difference_in_what_the_pod_or_the_shared_model_is_built_from_changes_the_key(change):
    assert key(**change) != key()


@pytest.mark.parametrize("change", [
    dict(method="lora"),
    dict(method="customDiffusion"),
    dict(training={"maxSteps": 900, "learningRate": 0.01, "batchSize": 4}),
    dict(earlyStopping={"criterion": "ema", "window": 80}),
    dict(concept={"images": {"path": "another/concept", "claimName": "concept-images"}, "classNoun": "cat"}),
    dict(output={"path": "runs/c", "claimName": "artifacts", "uri": "s3://b/c/"}),
], ids=lambda c: next(iter(c)))
def test_what_each_slot_keeps_for_itself_does_not_change_the_key(change):
    assert key(**change) == key()


def test_the_key_does_not_depend_on_the_name_when_the_output_follows_it():
    assert key("alpha", output={"path": "runs/alpha", "claimName": "artifacts"}) == \
        key("beta", output={"path": "runs/beta", "claimName": "artifacts"})


@pytest.mark.parametrize("spec, settings, why", [
    (dict(method="dreambooth"), SETTINGS, "changes the shared model"),
    (dict(method="tiDreambooth"), SETTINGS, "changes the shared model"),
    (dict(resources={"gpus": 2}), SETTINGS, "2 GPUs"),
    (dict(packing="never"), SETTINGS, "spec.packing is never"),
    (dict(output={"path": "runs/somewhere", "claimName": "artifacts"}), SETTINGS, "does not end in the job's name"),
    ({}, Settings(packing_enabled=False), "PJ_PACKING_ENABLED"),
])
def test_a_job_that_cannot_share_runs_solo_and_says_why(spec, settings, why):
    job = parsed("c", **spec)
    assert why in packing.unpackable_reason(job.spec, "c", settings)


def test_textual_inversion_lora_and_custom_diffusion_may_share():
    for method in ("textualInversion", "lora", "customDiffusion"):
        assert packing.unpackable_reason(parsed(method=method).spec, "c", SETTINGS) is None


def test_the_pack_output_is_the_folder_above_each_members_path():
    assert packing.output_root(parsed(output={"path": "runs/c", "claimName": "artifacts"}).spec) == "/output/runs"
    assert packing.output_root(parsed(output={"path": "c", "claimName": "artifacts"}).spec) == "/output"
    assert packing.output_root(parsed(output={"path": "output"}).spec) == "/output"  # no claim: the pod's own


def view(name, members, created=True, finished=False, uris=()):
    out = PackView(name, job_created=created, job_finished=finished)
    for i, active in enumerate(members):
        out.members[f"m{i}"] = Member(f"m{i}", f"u{i}", i, active, uris[i] if i < len(uris) else None)
    return out


K = "0123456789"


def test_choose_fills_the_fullest_open_pack_of_the_key():
    small = view(f"pack-{K}-aaaaaaaa", [True])
    full = view(f"pack-{K}-bbbbbbbb", [True] * 4)
    fuller = view(f"pack-{K}-cccccccc", [True, True, True])
    other_key = view("pack-9999999999-dddddddd", [True, True, True])
    assert packing.choose([small, full, fuller, other_key], K, None, 4).name == fuller.name
    assert packing.choose([full], K, None, 4) is None


def test_a_pack_is_closed_once_its_job_ended_or_all_its_members_finished():
    assert packing.choose([view(f"pack-{K}-a", [True], finished=True)], K, None, 8) is None
    assert packing.choose([view(f"pack-{K}-a", [False, False])], K, None, 8) is None
    # Still collecting (no Job yet): open even before any member is active.
    assert packing.choose([view(f"pack-{K}-a", [], created=False)], K, None, 8) is not None


def test_a_finished_members_slot_is_the_first_free_one():
    pack = view(f"pack-{K}-a", [True, False, True])
    assert pack.free_slot(3) == 1
    assert pack.free_slot(2) is None


def test_two_members_writing_the_same_uri_never_share_a_pack():
    pack = view(f"pack-{K}-a", [True], uris=["s3://b/x/"])
    assert packing.choose([pack], K, "s3://b/x/", 8) is None
    assert packing.choose([pack], K, "s3://b/y/", 8) is pack


def test_the_pack_name_carries_the_key_and_is_the_same_for_the_same_founder():
    name = packing.pack_name(K, "uid-1")
    assert packing.key_of(name) == K and name == packing.pack_name(K, "uid-1") != packing.pack_name(K, "uid-2")
    assert len(name) <= 63


def test_a_role_naming_no_member_is_refused():
    # Empty resourceNames would grant every PersonalizationJob of the namespace.
    with pytest.raises(ValueError):
        pack_children.role_rules([])
