"""The chart's packing values reach the operator, and its RBAC lets the operator do what a pack needs."""

from __future__ import annotations

import pytest

from ship_helpers import manifests, one, operator_env, render

pytest.importorskip("helm_python", reason="helm-python-sdk is not installed")

from pj_operator import pack_children, settings as settings_mod  # noqa: E402


def test_packing_is_on_by_default_with_eight_slots_and_a_thirty_second_wait():
    settings = settings_mod.Settings.from_env(operator_env())
    assert settings.packing_enabled is True
    assert (settings.packing_max_slots, settings.packing_wait_seconds) == (8, 30)
    assert settings.packing_idle_exit_seconds == 120


def test_packing_values_reach_the_operator():
    env = operator_env({"packing": {"enabled": False, "maxSlots": 4, "waitSeconds": 5, "idleExitSeconds": 90}})
    settings = settings_mod.Settings.from_env(env)
    assert settings.packing_enabled is False
    assert (settings.packing_max_slots, settings.packing_wait_seconds, settings.packing_idle_exit_seconds) == (4, 5, 90)


def test_the_operator_may_patch_a_packs_objects_and_grant_its_role():
    rules = one(manifests(render()), "ClusterRole")["rules"]
    grants = {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert {("", "configmaps", "patch"), ("rbac.authorization.k8s.io", "roles", "patch"),
            ("batch", "jobs", "patch")} <= grants
    # RBAC only lets the operator write a Role granting verbs it holds itself.
    role = {"rules": pack_children.role_rules(["a", "b"])}
    wanted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
              for v in rule["verbs"]}
    assert wanted <= grants
