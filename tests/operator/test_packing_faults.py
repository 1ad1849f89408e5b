"""Packs when things go wrong: members deleted, pods killed, packs that never start, operator
restarts, bad members, spec changes. Each member stays a job of its own."""

from __future__ import annotations

from fake_cluster import PJ, condition, pj_manifest, status_of, wait_for
from pj_operator import lifecycle, pack_lifecycle

PACKING = dict(PJ_PACKING_ENABLED="true", PJ_MAX_CONCURRENT_JOBS="0")
ROLE = ("rbac.authorization.k8s.io/v1", "Role")


def phase(cluster, name, namespace="default"):
    return status_of(cluster, name, namespace).get("phase")


def running_pack(cluster, count, **spec):
    """`count` compatible jobs packed, their pod running; returns (pack, members)."""
    members = [f"c{i}" for i in range(count)]
    for name in members:
        cluster.create(pj_manifest(name, **spec))
    wait_for(lambda: len(cluster.creations("jobs")) == 1, what="the pack's Job")
    pack = cluster.pack_of("c0")
    assert {cluster.pack_of(n) for n in members} == {pack}
    cluster.start_pod(pack)
    cluster.pod_running(pack)
    wait_for(lambda: all(phase(cluster, n) == "Running" for n in members), what="members Running")
    return pack, members


def children_created(cluster):
    """Objects created besides the test's own (resources, pods) and events."""
    return len([r for r in cluster.requests if r.action is not None and r.action.name == "CREATE"
                and r.resource.plural not in ("events", "pods", "personalizationjobs")])


def role_members(cluster, pack):
    role = cluster.get(*ROLE, "default", f"{pack}-trainer")
    return role and role["rules"][1]["resourceNames"]


def test_deleting_a_member_frees_its_slot_and_deleting_all_ends_the_pack(cluster, run_operator):
    with run_operator(**PACKING, PJ_PACKING_MAX_SLOTS="3"):
        pack, members = running_pack(cluster, 3)
        cluster.delete(*PJ, "default", "c1")
        wait_for(lambda: cluster.pack_files(pack) == ["c0", "c2"], what="c1's file gone from the pack")
        wait_for(lambda: role_members(cluster, pack) == ["c0", "c2"], what="c1 gone from the Role")
        assert phase(cluster, "c0") == "Running" and phase(cluster, "c2") == "Running"
        assert cluster.job(pack) is not None

        # Its slot is free: the next compatible job takes it in the running pack.
        cluster.create(pj_manifest("next"))
        wait_for(lambda: cluster.pack_of("next") == pack, what="next joins the pack")
        assert status_of(cluster, "next")["pack"]["slot"] == 1

        for name in ("c0", "c2", "next"):
            cluster.delete(*PJ, "default", name)
        wait_for(lambda: cluster.job(pack) is None and cluster.get("v1", "ConfigMap", "default", f"{pack}-config")
                 is None and cluster.get(*ROLE, "default", f"{pack}-trainer") is None
                 and cluster.get("v1", "ServiceAccount", "default", f"{pack}-trainer") is None,
                 what="the garbage collector removes the pack with its last member")
        assert len(cluster.creations("jobs")) == 1


def test_a_killed_pod_is_retried_and_finished_members_stay_succeeded(cluster, run_operator):
    with run_operator(**PACKING, PJ_PACKING_MAX_SLOTS="3"):
        pack, members = running_pack(cluster, 3)
        cluster.member_finishes("c0", step=150)
        wait_for(lambda: phase(cluster, "c0") == "Succeeded")
        cluster.member_trains("c1", 90)

        # Preempted: the Job controller ignores the failure (DisruptionTarget) and starts a new pod.
        assert cluster.pod_preempted(pack) == "Ignore"
        cluster.start_pod(pack, attempt=1)
        wait_for(lambda: phase(cluster, "c1") == "Pending" and phase(cluster, "c2") == "Pending",
                 what="the active members wait for the new pod")
        cluster.pod_running(pack, attempt=1)
        wait_for(lambda: phase(cluster, "c1") == "Running" and phase(cluster, "c2") == "Running")
        # OOM-killed: counted, retried from the pack's checkpoint.
        assert cluster.pod_failed(pack, reason="OOMKilled", exit_code=137, attempt=1) == "Count"
        cluster.start_pod(pack, attempt=2)
        cluster.pod_running(pack, attempt=2)
        wait_for(lambda: phase(cluster, "c1") == "Running" and status_of(cluster, "c1").get("attempts") == 2)
        assert phase(cluster, "c0") == "Succeeded"
        assert cluster.pack_files(pack) == members  # the retried trainer sees every member again
        assert len(cluster.creations("jobs")) == 1

        cluster.member_finishes("c1", step=200)
        cluster.member_finishes("c2", converged=False)
        wait_for(lambda: phase(cluster, "c1") == "Succeeded" and phase(cluster, "c2") == "Succeeded")
        assert condition(status_of(cluster, "c2"), "Succeeded")["reason"] == lifecycle.MAX_STEPS
        cluster.job_succeeded(pack, attempt=2)  # idle: the trainer exits


def test_a_pack_that_never_starts_fails_its_members_with_the_solo_reason(cluster, run_operator):
    with run_operator(**PACKING, PJ_PACKING_MAX_SLOTS="2", PJ_START_FAILURE_GRACE_SECONDS="0"):
        for name in ("c0", "c1"):
            cluster.create(pj_manifest(name, output={"path": f"x/{name}", "claimName": "artifacts",
                                                     "uri": f"s3://b/{name}", "secretRef": {"name": "s3-credz"}}))
        wait_for(lambda: len(cluster.creations("jobs")) == 1)
        pack = cluster.pack_of("c0")
        cluster.start_pod(pack)
        cluster.pod_waiting(pack, "CreateContainerConfigError", 'secret "s3-credz" not found')
        for name in ("c0", "c1"):
            failed = wait_for(lambda: phase(cluster, name) == "Failed" and condition(status_of(cluster, name), "Failed"))
            assert failed["reason"] == "CreateContainerConfigError"
            assert 'secret "s3-credz" not found' in failed["message"]
        wait_for(lambda: cluster.job(pack) is None, what="the Job deleted (it would hold a GPU)")
        assert len(cluster.creations("jobs")) == 1  # its members are not packed again


def test_a_member_with_bad_input_fails_alone(cluster, run_operator):
    with run_operator(**PACKING, PJ_PACKING_MAX_SLOTS="3"):
        pack, members = running_pack(cluster, 3)
        cluster.member_trains("c0", 20)
        cluster.member_fails("c1", "spec.concept.images: no images in /mnt/concept-images/concept")
        failed = wait_for(lambda: phase(cluster, "c1") == "Failed" and condition(status_of(cluster, "c1"), "Failed"))
        assert failed["reason"] == pack_lifecycle.TRAINER_FAILED and "no images in" in failed["message"]
        assert phase(cluster, "c0") == "Running" and phase(cluster, "c2") == "Running"
        assert any(e["reason"].startswith("Failed/") for e in cluster.events_for("c1"))
        assert not any(e["reason"].startswith("Failed/") for e in cluster.events_for("c0"))


def test_an_error_in_the_shared_step_fails_the_members_that_trained_in_it_and_no_one_else(cluster, run_operator):
    with run_operator(**PACKING, PJ_PACKING_MAX_SLOTS="3"):
        pack, members = running_pack(cluster, 3)
        cluster.member_finishes("c0")
        wait_for(lambda: phase(cluster, "c0") == "Succeeded")
        # The trainer fails every member that trained in the step (their result.json says Failed,
        # so its retry does not train them again), then exits with the error.
        for name in ("c1", "c2"):
            cluster.member_fails(name, "RuntimeError: CUDA error: an illegal memory access was encountered")
        assert cluster.pod_failed(pack, exit_code=1) == "Count"
        for name in ("c1", "c2"):
            failed = wait_for(lambda: phase(cluster, name) == "Failed" and condition(status_of(cluster, name), "Failed"))
            assert failed["reason"] == pack_lifecycle.TRAINER_FAILED and "illegal memory access" in failed["message"]
        cluster.start_pod(pack, attempt=1)
        cluster.pod_running(pack, attempt=1)
        cluster.job_succeeded(pack, attempt=1)  # nothing left to train: it exits idle
        assert phase(cluster, "c0") == "Succeeded"
        assert [phase(cluster, n) for n in ("c1", "c2")] == ["Failed", "Failed"]


def test_a_member_the_trainer_never_took_up_joins_another_pack(cluster, run_operator):
    with run_operator(**PACKING, PJ_PACKING_MAX_SLOTS="2", PJ_PACKING_WAIT_SECONDS="1"):
        pack, members = running_pack(cluster, 2)
        cluster.member_finishes("c0")
        wait_for(lambda: phase(cluster, "c0") == "Succeeded")
        cluster.create(pj_manifest("late"))
        wait_for(lambda: cluster.pack_of("late") == pack)
        # The last member finishes and the trainer exits before its --jobs folder showed "late".
        cluster.member_finishes("c1")
        cluster.job_succeeded(pack)
        again = wait_for(lambda: cluster.pack_of("late") not in (None, pack) and cluster.pack_of("late"),
                         what="late packed again")
        wait_for(lambda: cluster.job(again), what="its new pack's Job")
        assert phase(cluster, "c1") == "Succeeded"
        assert any(e["reason"] == "PackEnded" for e in cluster.events_for("late"))
        # The second pack's trainer refuses it too (without a status report): it fails, not loops.
        cluster.start_pod(again)
        cluster.pod_running(again)
        cluster.job_succeeded(again)
        failed = wait_for(lambda: phase(cluster, "late") == "Failed" and condition(status_of(cluster, "late"), "Failed"))
        assert failed["reason"] == pack_lifecycle.NEVER_TRAINED
        assert len(cluster.creations("jobs")) == 2


def test_operator_restart_adopts_its_packs_without_duplicates(cluster, run_operator):
    with run_operator(**PACKING, PJ_PACKING_MAX_SLOTS="4", PJ_PACKING_WAIT_SECONDS="1"):
        pack, members = running_pack(cluster, 3)
    # While the operator is down: one member is deleted, another joins status-first and crashes
    # before the pack's objects name it (a crash mid-join).
    cluster.delete(*PJ, "default", "c2")
    cluster.create(pj_manifest("mid"))
    cluster.patch_status(*PJ, "default", "mid", {"phase": "Pending", "jobName": pack,
                                                 "pack": {"job": pack, "slot": 2, "members": ["c0", "c1", "mid"]}})
    cluster.member_finishes("c0")
    creates = children_created(cluster)

    with run_operator(**PACKING, PJ_PACKING_MAX_SLOTS="4"):
        wait_for(lambda: cluster.pack_files(pack) == ["c0", "c1", "mid"], what="the pack's files repaired")
        wait_for(lambda: role_members(cluster, pack) == ["c0", "c1", "mid"])
        wait_for(lambda: cluster.pj("mid")["metadata"]["uid"] in
                 {r["uid"] for r in cluster.job(pack)["metadata"]["ownerReferences"]}, what="mid owns the Job")
        wait_for(lambda: phase(cluster, "c0") == "Succeeded")
        # A new compatible job fills the pack's last free slot, not a new pack.
        cluster.create(pj_manifest("new"))
        wait_for(lambda: cluster.pack_of("new") == pack)
        assert status_of(cluster, "new")["pack"]["slot"] in (0, 3)
        assert {cluster.pack_of(n) for n in ("c1", "mid", "new")} == {pack}
    assert children_created(cluster) == creates  # adopted: nothing of the pack made twice
    assert len(cluster.creations("jobs")) == 1 and len(cluster.creations("configmaps")) == 1


def test_a_spec_change_to_a_running_member_is_refused_as_for_a_solo_job(cluster, run_operator):
    with run_operator(**PACKING, PJ_PACKING_MAX_SLOTS="2"):
        pack, members = running_pack(cluster, 2)
        cluster.kube.patch(*PJ, "default", "c1", {"spec": {"training": {"maxSteps": 800}}})
        refused = wait_for(lambda: condition(status_of(cluster, "c1"), "SpecChangeRefused"))
        assert refused["status"] == "True" and pack in refused["message"]
        cluster.kube.patch(*PJ, "default", "c1", {"spec": {"training": {"maxSteps": 400}}})
        wait_for(lambda: condition(status_of(cluster, "c1"), "SpecChangeRefused")["status"] == "False",
                 what="the refusal cleared when the spec is the pack's again")
        assert phase(cluster, "c1") == "Running" and cluster.pack_files(pack) == members


def test_operator_restart_repairs_a_role_that_missed_a_member(cluster, run_operator):
    """A crash between the ConfigMap's patch and the Role's: the trainer could not report on the
    member until the restarted operator names it in the Role again."""
    with run_operator(**PACKING, PJ_PACKING_MAX_SLOTS="2"):
        pack, members = running_pack(cluster, 2)
    cluster.kube.patch(*ROLE, "default", f"{pack}-trainer", {"rules": [
        dict(rule, resourceNames=["c0"]) for rule in cluster.get(*ROLE, "default", f"{pack}-trainer")["rules"]]})
    with run_operator(**PACKING, PJ_PACKING_MAX_SLOTS="2"):
        wait_for(lambda: role_members(cluster, pack) == ["c0", "c1"], what="the Role names c1 again")
        assert cluster.pack_files(pack) == members and len(cluster.creations("roles")) == 1
