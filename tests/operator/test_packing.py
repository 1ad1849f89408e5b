"""Packing end to end on the strict fake API server: compatible jobs of one namespace share one
Job and pod (a pack), each still its own PersonalizationJob. The fake trainer (fake_cluster)
reads the pack's ConfigMap as its --jobs folder and patches each member's own status."""

from __future__ import annotations

import yaml

from fake_cluster import condition, pj_manifest, status_of, wait_for
from pj_operator import lifecycle

PACKING = dict(PJ_PACKING_ENABLED="true", PJ_MAX_CONCURRENT_JOBS="0")


def phase(cluster, name, namespace="default"):
    return status_of(cluster, name, namespace).get("phase")


def create_jobs(cluster, count, prefix="c", namespace="default", **spec):
    jobs = [f"{prefix}{i}" for i in range(count)]
    for name in jobs:
        cluster.create(pj_manifest(name, namespace, **spec))
    return jobs


def jobs_created(cluster):
    return sorted(r.data["metadata"]["name"] for r in cluster.creations("jobs"))


def packed(cluster, names_, namespace="default"):
    return all(cluster.pack_of(n, namespace) for n in names_)


def test_eight_compatible_jobs_make_one_job_and_a_ninth_a_second(cluster, run_operator):
    with run_operator(**PACKING, PJ_PACKING_WAIT_SECONDS="8"):
        members = create_jobs(cluster, 8)
        # Full: its Job starts without waiting out the collecting time.
        wait_for(lambda: len(cluster.creations("jobs")) == 1, what="the pack's Job")
        pack = cluster.pack_of("c0")
        assert pack.startswith("pack-") and {cluster.pack_of(n) for n in members} == {pack}
        assert sorted(status_of(cluster, n)["pack"]["slot"] for n in members) == list(range(8))
        assert cluster.pack_files(pack) == sorted(members)

        job = cluster.job(pack)
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert container["command"][:6] == ["personalize-train", "pack", "--jobs", "/etc/personalization/jobs",
                                            "--output", "/output/runs"]
        assert container["command"][container["command"].index("--max-slots") + 1] == "8"
        assert container["command"][container["command"].index("--idle-exit") + 1] == "120"
        assert container["command"][container["command"].index("--metrics-linger") + 1] == "30"  # the solo linger
        assert {e["name"] for e in container["env"]} >= {"PJ_NAMESPACE"} and \
            "PJ_NAME" not in {e["name"] for e in container["env"]}
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        # Each member's file is the manifest a solo trainer reads.
        config = cluster.get("v1", "ConfigMap", "default", f"{pack}-config")
        manifest = yaml.safe_load(config["data"]["c3.yaml"])
        assert manifest["metadata"] == {"name": "c3", "namespace": "default"}
        assert manifest["spec"]["concept"]["images"]["path"] == "/mnt/concept-images/concept"

        # Every member owns the Job and the ConfigMap: they go only with the last one.
        uids = {cluster.pj(n)["metadata"]["uid"] for n in members}
        assert {r["uid"] for r in job["metadata"]["ownerReferences"]} == uids
        assert {r["uid"] for r in config["metadata"]["ownerReferences"]} == uids
        # The trainer may read and patch exactly its members.
        role = cluster.get("rbac.authorization.k8s.io/v1", "Role", "default", f"{pack}-trainer")
        assert all(rule["resourceNames"] == sorted(members) for rule in role["rules"])

        cluster.create(pj_manifest("c8"))
        second = wait_for(lambda: cluster.pack_of("c8"), what="the ninth job packed")
        assert second != pack
        wait_for(lambda: cluster.job(second), what="the second pack's Job", timeout=45)
        assert len(jobs_created(cluster)) == 2

        cluster.start_pod(pack)
        cluster.pod_running(pack)
        wait_for(lambda: all(phase(cluster, n) == "Running" for n in members), what="members Running")
        status = status_of(cluster, "c5")
        assert status["jobName"] == pack and status["pack"]["members"] == sorted(members)


def test_a_finished_slot_is_refilled_through_the_pack_config(cluster, run_operator):
    with run_operator(**PACKING, PJ_PACKING_MAX_SLOTS="2", PJ_PACKING_WAIT_SECONDS="30"):
        create_jobs(cluster, 2)
        wait_for(lambda: len(cluster.creations("jobs")) == 1, what="the pack's Job")
        pack = cluster.pack_of("c0")
        cluster.start_pod(pack)
        cluster.pod_running(pack)
        wait_for(lambda: phase(cluster, "c0") == "Running" and phase(cluster, "c1") == "Running")

        cluster.member_trains("c0", 50)
        cluster.member_finishes("c0", step=120)
        status = wait_for(lambda: phase(cluster, "c0") == "Succeeded" and status_of(cluster, "c0"))
        assert condition(status, "Succeeded")["reason"] == lifecycle.EARLY_STOPPED
        assert phase(cluster, "c1") == "Running"  # the pack goes on

        cluster.create(pj_manifest("late"))
        wait_for(lambda: cluster.pack_of("late") == pack, what="the late job joins the running pack")
        wait_for(lambda: cluster.pack_files(pack) == ["c0", "c1", "late"], what="its file in the pack's folder")
        status = status_of(cluster, "late")
        assert status["phase"] == "Running" and status["pack"]["slot"] == 0  # c0's slot
        assert condition(status, "Running")["reason"] == "JoinedPack"
        wait_for(lambda: cluster.get("rbac.authorization.k8s.io/v1", "Role", "default", f"{pack}-trainer")
                 ["rules"][1]["resourceNames"] == ["c0", "c1", "late"], what="late named in the Role")
        wait_for(lambda: cluster.pj("late")["metadata"]["uid"] in
                 {r["uid"] for r in cluster.job(pack)["metadata"]["ownerReferences"]}, what="late owns the Job")
        assert jobs_created(cluster) == [pack]


def test_jobs_in_two_namespaces_make_two_packs(cluster, run_operator):
    cluster.server.namespaces |= {"team-a", "team-b"}
    with run_operator(**PACKING, PJ_PACKING_WAIT_SECONDS="1"):
        a = create_jobs(cluster, 3, "a", "team-a")
        b = create_jobs(cluster, 3, "b", "team-b")
        wait_for(lambda: len(cluster.creations("jobs")) == 2, what="one Job per namespace")
        pack_a, pack_b = cluster.pack_of("a0", "team-a"), cluster.pack_of("b0", "team-b")
        assert {cluster.pack_of(n, "team-a") for n in a} == {pack_a}
        assert {cluster.pack_of(n, "team-b") for n in b} == {pack_b}
        assert cluster.get("batch/v1", "Job", "team-a", pack_a) and cluster.get("batch/v1", "Job", "team-b", pack_b)
        assert cluster.pack_files(pack_a, "team-a") == a and cluster.pack_files(pack_b, "team-b") == b


def test_dreambooth_and_packing_never_run_solo(cluster, run_operator):
    with run_operator(**PACKING, PJ_PACKING_WAIT_SECONDS="1"):
        cluster.create(pj_manifest("db", method="dreambooth"))
        cluster.create(pj_manifest("mine", packing="never"))
        cluster.create(pj_manifest("two-gpus", resources={"gpus": 2}))
        create_jobs(cluster, 2)
        wait_for(lambda: len(cluster.creations("jobs")) == 4, what="three solo Jobs and a pack")
        for solo in ("db", "mine", "two-gpus"):
            job = cluster.job(solo)
            assert job["spec"]["template"]["spec"]["containers"][0]["command"][:2] == ["personalize-train", "--config"]
            assert "pack" not in status_of(cluster, solo) and status_of(cluster, solo)["jobName"] == solo
        assert cluster.pack_files(cluster.pack_of("c0")) == ["c0", "c1"]


def test_incompatible_jobs_and_the_same_output_uri_get_their_own_packs(cluster, run_operator):
    with run_operator(**PACKING, PJ_PACKING_WAIT_SECONDS="1"):
        cluster.create(pj_manifest("fp16", training={"maxSteps": 400, "mixedPrecision": "fp16"}))
        cluster.create(pj_manifest("plain"))
        cluster.create(pj_manifest("elsewhere", resources={"gpus": 1, "nodeSelector": {"pool": "other"}}))
        for name in ("up-1", "up-2"):
            cluster.create(pj_manifest(name, output={"path": f"runs/{name}", "claimName": "artifacts",
                                                     "uri": "s3://bucket/shared/"}))
        wait_for(lambda: len(cluster.creations("jobs")) == 4, what="four packs")
        packs = {n: cluster.pack_of(n) for n in ("fp16", "plain", "elsewhere", "up-1", "up-2")}
        assert len({packs["fp16"], packs["plain"], packs["elsewhere"]}) == 3
        assert packs["up-1"] != packs["up-2"]
        assert packs["plain"] in (packs["up-1"], packs["up-2"])  # otherwise compatible: it shares one
