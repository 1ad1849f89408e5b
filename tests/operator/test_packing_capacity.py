"""Packs against the concurrency cap and Kueue, the trainer's RBAC in a pack, the API requests a
member costs, and the packing metrics."""

from __future__ import annotations

import datetime
import itertools

from prometheus_client import REGISTRY

from fake_cluster import condition, pj_manifest, status_of, wait_for
from rbac_eval import Request, allows

GROUP = "personalization.dvar.dev"
PACKING = dict(PJ_PACKING_ENABLED="true", PJ_MAX_CONCURRENT_JOBS="0")


def phase(cluster, name, namespace="default"):
    return status_of(cluster, name, namespace).get("phase")


def sample(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_pack_holds_one_slot_of_the_cap_and_compatible_jobs_join_it_without_one(cluster, run_operator):
    with run_operator(PJ_PACKING_ENABLED="true", PJ_MAX_CONCURRENT_JOBS="1", PJ_PACKING_WAIT_SECONDS="1"):
        for name in ("c0", "c1", "c2"):
            cluster.create(pj_manifest(name))
        wait_for(lambda: len(cluster.creations("jobs")) == 1, what="the pack's Job")
        pack = cluster.pack_of("c0")
        assert {cluster.pack_of(n) for n in ("c0", "c1", "c2")} == {pack}
        cluster.create(pj_manifest("db", method="dreambooth"))
        queued = wait_for(lambda: phase(cluster, "db") == "Queued" and condition(status_of(cluster, "db"), "Queued"))
        assert "(1/1 jobs running)" in queued["message"]
        cluster.start_pod(pack)
        cluster.pod_running(pack)
        cluster.create(pj_manifest("c3"))
        wait_for(lambda: cluster.pack_of("c3") == pack, what="a compatible job joins the running pack")
        assert phase(cluster, "db") == "Queued" and cluster.job("db") is None

        for name in ("c0", "c1", "c2", "c3"):
            cluster.member_finishes(name)
        wait_for(lambda: cluster.job("db"), what="the pack's slot passes to the queued job")


def test_with_kueue_the_pack_job_carries_the_queue_and_is_admitted_as_one_workload(cluster, run_operator):
    with run_operator(**PACKING, PJ_KUEUE_ENABLED="true", PJ_PACKING_WAIT_SECONDS="1"):
        for name in ("k0", "k1"):
            cluster.create(pj_manifest(name, queueName="gpu-queue"))
        cluster.create(pj_manifest("other-queue", queueName="cpu-queue"))
        wait_for(lambda: len(cluster.creations("jobs")) == 2, what="one pack per queue")
        pack = cluster.pack_of("k0")
        assert cluster.pack_of("k1") == pack and cluster.pack_of("other-queue") != pack
        job = cluster.job(pack)
        assert job["spec"]["suspend"] is True
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
        limits = job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "1"  # one workload, one GPU, for every member
        for name in ("k0", "k1"):
            queued = wait_for(lambda: phase(cluster, name) == "Queued" and condition(status_of(cluster, name), "Queued"))
            assert queued["reason"] == "WaitingForKueue"
        cluster.kueue_admits(pack)
        cluster.start_pod(pack)
        cluster.pod_running(pack)
        wait_for(lambda: phase(cluster, "k0") == "Running" and phase(cluster, "k1") == "Running")


def test_the_pack_role_lets_the_trainer_read_and_patch_exactly_its_members(cluster, run_operator):
    cluster.server.namespaces |= {"team-a"}
    with run_operator(**PACKING, PJ_PACKING_WAIT_SECONDS="1"):
        for name in ("cat", "dog"):
            cluster.create(pj_manifest(name, "team-a"))
        cluster.create(pj_manifest("never", "team-a", packing="never"))
        wait_for(lambda: cluster.get("batch/v1", "Job", "team-a", cluster.pack_of("cat", "team-a") or "-"))
        pack = cluster.pack_of("cat", "team-a")
        role = cluster.get("rbac.authorization.k8s.io/v1", "Role", "team-a", f"{pack}-trainer")
        verbs = ["get", "list", "watch", "create", "update", "patch", "delete"]
        resources = [(GROUP, "personalizationjobs"), (GROUP, "personalizationjobs/status"), ("", "secrets"),
                     ("", "configmaps"), ("batch", "jobs")]
        allowed = {(r.verb, r.resource, r.name)
                   for verb, (group, resource), who in itertools.product(verbs, resources, ["cat", "dog", "never", None])
                   for r in [Request(verb, group, resource, who)] if allows(role, r)}
        assert allowed == {(v, r, n) for n in ("cat", "dog") for v, r in [
            ("get", "personalizationjobs"), ("get", "personalizationjobs/status"),
            ("patch", "personalizationjobs/status")]}
        binding = cluster.get("rbac.authorization.k8s.io/v1", "RoleBinding", "team-a", f"{pack}-trainer")
        pod = cluster.get("batch/v1", "Job", "team-a", pack)["spec"]["template"]["spec"]
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"],
                                        "namespace": "team-a"}]
        # The pod mounts its members' secrets only (here: none).
        assert "envFrom" not in pod["containers"][0]


def lifecycle_requests(cluster, mark):
    counts = cluster.requests_by_verb(cluster.operator_requests(mark))
    return {k: n for k, n in counts.items() if not k.endswith(" events")}


def test_a_member_costs_at_most_ten_requests_founding_or_joining(cluster, run_operator):
    with run_operator(**PACKING, PJ_POLL_INTERVAL="3600", PJ_PACKING_MAX_SLOTS="2", PJ_PACKING_WAIT_SECONDS="1"):
        mark = len(cluster.requests)
        cluster.create(pj_manifest("founder"))
        wait_for(lambda: cluster.creations("jobs"), what="the pack's Job (collecting time over)")
        pack = cluster.pack_of("founder")
        cluster.start_pod(pack)
        cluster.pod_running(pack)
        wait_for(lambda: phase(cluster, "founder") == "Running")
        cluster.member_trains("founder", 50)
        founding = lifecycle_requests(cluster, mark)

        # A second job joins the running pack and finishes while the founder trains on.
        mark = len(cluster.requests)
        cluster.create(pj_manifest("joiner"))
        wait_for(lambda: cluster.pack_of("joiner") == pack)
        cluster.member_trains("joiner", 50)
        cluster.member_finishes("joiner")
        wait_for(lambda: phase(cluster, "joiner") == "Succeeded")
        wait_for(lambda: any(e["reason"].startswith("Succeeded/") for e in cluster.events_for("joiner")))
        joining = lifecycle_requests(cluster, mark)
        assert sum(joining.values()) <= 10, joining
        assert joining.get("create jobs", 0) == 0 and joining.get("create configmaps", 0) == 0

        mark = len(cluster.requests)
        cluster.member_finishes("founder")
        wait_for(lambda: phase(cluster, "founder") == "Succeeded")
        wait_for(lambda: any(e["reason"].startswith("Succeeded/") for e in cluster.events_for("founder")))
        for key, n in lifecycle_requests(cluster, mark).items():
            founding[key] = founding.get(key, 0) + n
        assert sum(founding.values()) <= 10, founding


def started_ago(cluster, job, seconds):
    """The Job controller's startTime, `seconds` ago (the fake's clock has one-second resolution)."""
    when = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=seconds)
    cluster.patch_status("batch/v1", "Job", "default", job, {"startTime": when.strftime("%Y-%m-%dT%H:%M:%SZ")})


def test_pack_gauges_and_gpu_seconds_per_concept_packed_and_solo(cluster, run_operator):
    def observed(packing):
        return (sample("personalization_concept_gpu_seconds_count", packing=packing),
                sample("personalization_concept_gpu_seconds_sum", packing=packing),
                sample("personalization_concept_steps_total", packing=packing))

    packed_before, solo_before = observed("packed"), observed("solo")
    with run_operator(**PACKING, PJ_PACKING_MAX_SLOTS="2"):
        cluster.create(pj_manifest("a"))
        cluster.create(pj_manifest("b"))
        cluster.create(pj_manifest("solo", packing="never"))
        wait_for(lambda: len(cluster.creations("jobs")) == 2)
        pack = cluster.pack_of("a")
        wait_for(lambda: sample("personalization_packs") == 1 and sample("personalization_pack_members") == 2)
        for job in (pack, "solo"):
            cluster.start_pod(job)
            cluster.pod_running(job)
        started_ago(cluster, pack, 800)
        started_ago(cluster, "solo", 400)
        cluster.member_finishes("a", step=100)
        cluster.member_finishes("b", step=300)
        wait_for(lambda: phase(cluster, "a") == "Succeeded" and phase(cluster, "b") == "Succeeded")
        assert sample("personalization_pack_members") == 0
        cluster.job_succeeded(pack)
        cluster.member_finishes("solo", step=200)
        cluster.job_succeeded("solo")
        wait_for(lambda: observed("packed")[0] == packed_before[0] + 2, what="two packed concepts counted")
        wait_for(lambda: observed("solo")[0] == solo_before[0] + 1, what="one solo concept counted")
        count, seconds, steps = (now - before for now, before in zip(observed("packed"), packed_before))
        # The pack's ~800 GPU-seconds, split 100:300 by the members' steps: both counted, all of it.
        assert 800 <= seconds <= 830 and steps == 400
        count, seconds, steps = (now - before for now, before in zip(observed("solo"), solo_before))
        assert 400 <= seconds <= 430 and steps == 200
        assert sample("personalization_packs") == 0
