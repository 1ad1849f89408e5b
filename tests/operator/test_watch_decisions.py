"""The queue pump decides from what the watches keep, not from listings (issue 32, point 13).

At steady state a tick sends no LIST of PersonalizationJobs, Jobs, pods or events, whatever the
number of jobs and namespaces; a full listing is the safety net for what no watch delivered.
PriorityClasses are listed only while a waiting job names one: without a named class every
waiting job has the same (global default) priority, and the queue is ordered by age alone.
"""

from __future__ import annotations

import time

from fake_cluster import condition, pj_manifest, status_of, wait_for

PUMP_KINDS = ("personalizationjobs", "jobs", "pods", "events", "priorityclasses")


def pump_listings(cluster, since: int) -> list[str]:
    """The operator's LIST requests of the kinds the pump decides from, since request `since`."""
    return [r.resource.plural for r in cluster.operator_requests(since)
            if r.action is not None and r.action.name == "LIST" and r.resource is not None
            and r.resource.plural in PUMP_KINDS]


def phase(cluster, name: str, namespace: str) -> str:
    return status_of(cluster, name, namespace).get("phase", "")


def test_ticks_at_steady_state_list_nothing_and_still_fail_a_pod_that_cannot_start(cluster, run_operator):
    cluster.server.namespaces |= {"team-a", "team-b"}
    # A cap of 2 with three jobs: every tick also places the waiting one in the queue.
    with run_operator(PJ_MAX_CONCURRENT_JOBS="2", PJ_START_FAILURE_GRACE_SECONDS="0"):
        cluster.create(pj_manifest("runs", "team-a"))
        wait_for(lambda: cluster.job("runs", "team-a"), what="the first Job")
        cluster.create(pj_manifest("stuck", "team-b"))
        wait_for(lambda: cluster.job("stuck", "team-b"), what="the second Job")
        cluster.create(pj_manifest("waits", "team-b"))
        wait_for(lambda: phase(cluster, "waits", "team-b") == "Queued", what="the queue")
        cluster.start_pod("runs", "team-a")
        cluster.pod_running("runs", "team-a")
        wait_for(lambda: phase(cluster, "runs", "team-a") == "Running")
        # A pod that waits for its node: its job is Pending, the case that looked at events.
        cluster.start_pod("stuck", "team-b")

        since = len(cluster.requests)
        time.sleep(3.0)  # ten ticks of the pump (PJ_POLL_INTERVAL=0.3, conftest.py)
        assert pump_listings(cluster, since) == []
        assert phase(cluster, "stuck", "team-b") == "Pending"

        # The kubelet cannot start it (a missing Secret): the pod watch shows it, a tick fails
        # the job and deletes its Job, and the slot goes to the waiting job.
        cluster.pod_waiting("stuck", "CreateContainerConfigError", 'secret "s3-credz" not found', "team-b")
        status = wait_for(lambda: phase(cluster, "stuck", "team-b") == "Failed"
                          and status_of(cluster, "stuck", "team-b"), what="the stuck job failed")
        assert condition(status, "Failed")["reason"] == "CreateContainerConfigError"
        wait_for(lambda: cluster.job("stuck", "team-b") is None, what="its Job deleted")
        wait_for(lambda: cluster.job("waits", "team-b"), what="the waiting job admitted")
        assert pump_listings(cluster, since) == []


def test_a_job_deleted_while_its_watch_was_away_is_caught_by_the_safety_resync(cluster, run_operator):
    with run_operator(PJ_RESYNC_INTERVAL="1"):
        cluster.create(pj_manifest("lost"))
        wait_for(lambda: cluster.job("lost"))
        cluster.start_pod("lost")
        cluster.pod_running("lost")
        wait_for(lambda: phase(cluster, "lost", "default") == "Running")

        # The Job watch expires and kopf's listing fails twice: the Job is deleted in the gap,
        # so neither the listing that follows nor any watch event tells of it.
        fault = cluster.inject("list", "jobs", 503, times=2, client="kopf")
        cluster.expire_watches("jobs")
        wait_for(lambda: fault.hits >= 1, what="kopf listing the Jobs again")
        cluster.delete("batch/v1", "Job", "default", "lost")

        status = wait_for(lambda: phase(cluster, "lost", "default") == "Failed" and status_of(cluster, "lost"),
                          what="the safety resync")
        assert condition(status, "Failed")["reason"] == "JobLost"


def test_the_resync_interval_is_a_setting():
    import pytest

    from pj_operator.settings import Settings

    assert Settings.from_env({}).resync_interval == Settings().resync_interval > Settings().poll_interval
    assert Settings.from_env({"PJ_RESYNC_INTERVAL": "600"}).resync_interval == 600.0
    for bad in ("0", "-1", "soon"):
        with pytest.raises(ValueError, match="PJ_RESYNC_INTERVAL"):
            Settings.from_env({"PJ_RESYNC_INTERVAL": bad})
