"""The fixture itself: it must refuse what a real API server refuses, or the e2e tests prove little."""

from __future__ import annotations

import pytest

from fake_cluster import PJ, pj_manifest
from pj_operator.kube import ApiError


def test_invalid_builtin_objects_are_refused(cluster):
    bad_job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j", "namespace": "default"},
               "spec": {"template": {"spec": {"containers": [{"name": "c", "imagePullPolicy": "Sometimes?",
                                                              "unknownField": 1}]}}}}
    with pytest.raises(ApiError) as err:
        cluster.create(bad_job)
    assert err.value.status == 422
    assert len(cluster.server.violations) == 1
    cluster.server.violations.clear()


def test_custom_resources_are_checked_against_the_crd(cluster):
    with pytest.raises(ApiError):
        cluster.create(pj_manifest("x", method="magic"))
    cluster.server.violations.clear()
    created = cluster.create(pj_manifest("x"))
    assert created["metadata"]["uid"] and created["metadata"]["generation"] == 1


def test_status_and_spec_are_separate_and_generation_follows_spec(cluster):
    cluster.create(pj_manifest("x"))
    cluster.kube.patch(*PJ, "default", "x", {"status": {"phase": "Running"}})  # main resource: status ignored
    assert "status" not in cluster.pj("x")
    cluster.patch_status(*PJ, "default", "x", {"phase": "Running"})
    cluster.kube.patch(*PJ, "default", "x", {"metadata": {"labels": {"a": "b"}}})
    assert cluster.pj("x")["metadata"]["generation"] == 1
    cluster.kube.patch(*PJ, "default", "x", {"spec": {"backoffLimit": 3}})
    pj = cluster.pj("x")
    assert pj["metadata"]["generation"] == 2 and pj["status"]["phase"] == "Running"
