"""The concurrency cap with its queue (priority, then age), and the Kueue path."""

from __future__ import annotations

import time

from fake_cluster import PJ, condition, pj_manifest, status_of, wait_for


def queued_message(cluster, name):
    cond = condition(status_of(cluster, name), "Queued")
    return cond and cond["status"] == "True" and cond["message"]


def test_cap_queues_by_priority_then_age_and_admits_as_slots_free(cluster, run_operator):
    cluster.create({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                    "metadata": {"name": "urgent"}, "value": 1000})
    with run_operator(PJ_MAX_CONCURRENT_JOBS="1"):
        cluster.create(pj_manifest("first"))
        wait_for(lambda: cluster.job("first"))
        cluster.create(pj_manifest("second"))
        wait_for(lambda: status_of(cluster, "second").get("phase") == "Queued")
        time.sleep(1.1)  # creationTimestamps have one-second resolution: make "third" strictly younger
        cluster.create(pj_manifest("third"))
        wait_for(lambda: status_of(cluster, "third").get("phase") == "Queued")
        # Younger but more urgent: it goes first.
        urgent = pj_manifest("urgent-one")
        urgent["spec"]["resources"]["priorityClassName"] = "urgent"
        cluster.create(urgent)

        assert wait_for(lambda: queued_message(cluster, "urgent-one") or "").startswith("waiting for capacity: position 1 of 3")
        assert wait_for(lambda: "position 2 of 3" in (queued_message(cluster, "second") or ""))
        assert wait_for(lambda: "position 3 of 3" in (queued_message(cluster, "third") or ""))
        assert "(1/1 jobs running)" in queued_message(cluster, "third")
        assert [r.data["metadata"]["name"] for r in cluster.creations("jobs")] == ["first"]

        # "first" finishes: exactly one slot frees, the urgent one takes it.
        cluster.start_pod("first")
        cluster.job_succeeded("first")
        wait_for(lambda: cluster.job("urgent-one"), what="the urgent job admitted")
        assert wait_for(lambda: "position 1 of 2" in (queued_message(cluster, "second") or ""))
        assert status_of(cluster, "third").get("phase") == "Queued"

        # Deleting a running job frees its slot as well.
        cluster.delete(*PJ, "default", "urgent-one")
        wait_for(lambda: cluster.job("second"), what="second admitted after the deletion")
        assert status_of(cluster, "third").get("phase") == "Queued"
        assert [r.data["metadata"]["name"] for r in cluster.creations("jobs")] == ["first", "urgent-one", "second"]
        admitted = status_of(cluster, "second")
        queued = next(c for c in admitted["conditions"] if c["type"] == "Queued")
        assert queued["status"] == "False" and queued["reason"] == "Admitted"


def test_kueue_job_starts_suspended_and_follows_kueue_admission(cluster, run_operator):
    with run_operator(PJ_MAX_CONCURRENT_JOBS="1", PJ_KUEUE_ENABLED="true"):
        cluster.create(pj_manifest("busy"))
        wait_for(lambda: cluster.job("busy"))
        # The cap is full, but a Kueue job is Kueue's to admit: its Job is created at once, suspended.
        cluster.create(pj_manifest("kq", queueName="gpu-queue"))
        job = wait_for(lambda: cluster.job("kq"))
        assert job["spec"]["suspend"] is True
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
        status = wait_for(lambda: status_of(cluster, "kq").get("phase") == "Queued" and status_of(cluster, "kq"))
        queued = next(c for c in status["conditions"] if c["type"] == "Queued")
        assert queued["reason"] == "WaitingForKueue" and "gpu-queue" in queued["message"]

        cluster.kueue_admits("kq")
        cluster.start_pod("kq")
        cluster.pod_running("kq")
        status = wait_for(lambda: status_of(cluster, "kq").get("phase") == "Running" and status_of(cluster, "kq"))
        assert next(c for c in status["conditions"] if c["type"] == "Queued")["status"] == "False"


def test_the_kueue_label_on_the_resource_queues_it_as_spec_queue_name_does(cluster, run_operator):
    with run_operator(PJ_MAX_CONCURRENT_JOBS="1", PJ_KUEUE_ENABLED="true"):
        cluster.create(pj_manifest("busy"))
        wait_for(lambda: cluster.job("busy"))
        labelled = pj_manifest("kl")
        labelled["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "gpu-queue", "team": "vision"}
        cluster.create(labelled)
        # Kueue's, not the cap's: created at once although the cap is full, suspended, with the label.
        job = wait_for(lambda: cluster.job("kl"))
        assert job["spec"]["suspend"] is True
        assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
        status = wait_for(lambda: status_of(cluster, "kl").get("phase") == "Queued" and status_of(cluster, "kl"))
        queued = condition(status, "Queued")
        assert queued["reason"] == "WaitingForKueue" and "gpu-queue" in queued["message"]
        # It holds no slot of the cap either: the next plain job still waits for "busy" only.
        cluster.create(pj_manifest("plain"))
        assert wait_for(lambda: "(1/1 jobs running)" in (queued_message(cluster, "plain") or ""))
        cluster.kueue_admits("kl")
        cluster.start_pod("kl")
        cluster.pod_running("kl")
        wait_for(lambda: status_of(cluster, "kl").get("phase") == "Running")


def test_queue_name_is_invalid_when_kueue_is_disabled(cluster, run_operator):
    with run_operator(PJ_KUEUE_ENABLED="false"):
        cluster.create(pj_manifest("kq", queueName="gpu-queue"))
        status = wait_for(lambda: status_of(cluster, "kq").get("phase") == "Failed" and status_of(cluster, "kq"))
        assert "Kueue integration is disabled" in next(c for c in status["conditions"] if c["type"] == "Valid")["message"]


def test_namespace_scoped_operator_ignores_other_namespaces(cluster, run_operator):
    cluster.server.namespaces |= {"team-a", "team-b"}
    with run_operator(extra_args=("--namespace", "team-a"), PJ_NAMESPACES="team-a", PJ_MAX_CONCURRENT_JOBS="1"):
        cluster.create(pj_manifest("mine", namespace="team-a"))
        cluster.create(pj_manifest("theirs", namespace="team-b"))
        wait_for(lambda: cluster.get("batch/v1", "Job", "team-a", "mine"))
        # Not ours: nothing happens to it (and it does not take a slot in our queue).
        cluster.create(pj_manifest("mine-2", namespace="team-a"))
        assert wait_for(lambda: "position 1 of 1" in (queued_message_ns(cluster, "team-a", "mine-2") or ""))
        assert "status" not in cluster.get(*PJ, "team-b", "theirs")
        assert [r.data["metadata"]["name"] for r in cluster.creations("jobs")] == ["mine"]


def queued_message_ns(cluster, namespace, name):
    pj = cluster.get(*PJ, namespace, name) or {}
    cond = next((c for c in (pj.get("status") or {}).get("conditions", []) if c["type"] == "Queued"), None)
    return cond and cond["message"]
