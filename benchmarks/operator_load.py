"""Operator load against the strict fake API server (kmock + schema validation, tests/operator).

Three measurements, the operator running as its own process (`python -m pj_operator.main`, the
same code as the `personalization-operator` console script) so its memory is its own:

1. API requests per job lifecycle, by verb and resource: one PersonalizationJob created, its Job
   started, running, two trainer status patches, completed. Counted from the operator's requests
   only (the harness marks its own with a User-Agent), after kopf's startup (discovery, initial
   listings, watch streams) is done. The queue pump is made idle (long interval) so the count
   is per lifecycle; its cost per tick is stated separately.
2. N resources (default 200) created at once: time from each resource's creation to its Job's
   creation, both taken where the API server receives the request (median, p90, max), and the
   operator's peak resident memory (VmHWM) before and after; CPU seconds of the fake API server
   and of the operator. Then the same with a concurrency cap (the rest must end up Queued).
3. A pod that can never start (CreateContainerConfigError: a missing Secret) with the default
   settings (poll interval 10 s, start-failure grace 60 s) and a cap of 1: seconds from the pod
   getting stuck to the resource's Failed phase, and to the next queued job's Job creation
   (its slot freed).

    python benchmarks/operator_load.py [--count 200] [--cap 20] [--skip-start-failure]

Writes benchmarks/results/operator_load.json. The machine is shared (2 cores, other jobs);
the numbers are upper bounds for a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "operator"))

from fake_cluster import PJ, FakeCluster, pj_manifest, wait_for  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "operator_load.json"


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def start_operator(cluster: FakeCluster, workdir: Path, env_extra: dict[str, str]) -> subprocess.Popen:
    env = dict(os.environ)
    env.update({
        "KUBECONFIG": str(cluster.write_kubeconfig(workdir / "kubeconfig")),
        "PJ_METRICS_PORT": "0", "PJ_HEALTH_PORT": "0", "PJ_POLL_INTERVAL": "3600",
        **env_extra,
    })
    env.pop("KUBERNETES_SERVICE_HOST", None)
    log = open(workdir / "operator.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pj_operator.main"], env=env, stdout=log, stderr=subprocess.STDOUT)
    wait_for(lambda: cluster.watching("personalizationjobs") and cluster.watching("jobs"), timeout=60,
             what="the operator's watches")
    time.sleep(1.0)  # let kopf finish its initial listing round
    return proc


def stop_operator(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def lifecycle_requests(cluster: FakeCluster, workdir: Path) -> dict:
    proc = start_operator(cluster, workdir, {})
    try:
        mark = len(cluster.requests)
        cluster.create(pj_manifest("bench-one"))
        wait_for(lambda: cluster.job("bench-one"), what="the Job")
        cluster.start_pod("bench-one")
        cluster.pod_running("bench-one")
        wait_for(lambda: (cluster.pj("bench-one").get("status") or {}).get("phase") == "Running")
        cluster.trainer_reports("bench-one", {"progress": {"step": 50, "maxSteps": 400, "percent": 12.5}})
        cluster.trainer_reports("bench-one", {
            "progress": {"step": 180, "maxSteps": 400, "percent": 45.0},
            "earlyStop": {"stopped": True, "reason": "ConvergenceThreshold", "step": 180, "stepsSaved": 220}})
        cluster.job_succeeded("bench-one")
        wait_for(lambda: (cluster.pj("bench-one").get("status") or {}).get("phase") == "Succeeded")
        wait_for(lambda: any(e["reason"].startswith("Succeeded/") for e in cluster.events_for("bench-one")),
                 what="the final event")
        time.sleep(1.0)  # let the last watch events drain through kopf
        ops = cluster.operator_requests(mark)
        by_verb = cluster.requests_by_verb(ops)
        totals: dict[str, int] = {}
        for key, n in by_verb.items():
            verb = key.split(" ")[0]
            totals[verb] = totals.get(verb, 0) + n
        return {"requests_by_verb_and_resource": by_verb, "requests_by_verb": totals,
                "total": sum(by_verb.values()), "violations": cluster.violations}
    finally:
        stop_operator(proc)


async def _create_all(cluster: FakeCluster, manifests: list[dict]) -> None:
    path = "/apis/personalization.dvar.dev/v1alpha1/namespaces/default/personalizationjobs"
    responses = await asyncio.gather(*(cluster.server.post(path, json=m) for m in manifests))
    for response in responses:
        if response.status != 201 and response.status != 200:
            raise RuntimeError(f"create failed: HTTP {response.status}: {await response.text()}")


def burst(cluster: FakeCluster, workdir: Path, count: int, cap: int) -> dict:
    proc = start_operator(cluster, workdir, {"PJ_MAX_CONCURRENT_JOBS": str(cap)})
    try:
        idle_hwm = vm_hwm_kib(proc.pid)
        names = [f"burst-{i:03d}" for i in range(count)]
        mark = len(cluster.requests)
        server_cpu_before = cluster.server_cpu_seconds()
        operator_cpu_before = process_cpu_seconds(proc.pid)
        started = time.monotonic()
        future = asyncio.run_coroutine_threadsafe(_create_all(cluster, [pj_manifest(n) for n in names]),
                                                  cluster._loop)
        future.result(timeout=120)
        expected = count if cap <= 0 else min(cap, count)
        created_at = cluster.server.created_at
        wait_for(lambda: sum(("jobs", "default", n) in created_at for n in names) >= expected, timeout=600,
                 what=f"{expected} Jobs")
        all_jobs = time.monotonic() - started
        latencies = sorted(created_at[("jobs", "default", n)] - created_at[("personalizationjobs", "default", n)]
                           for n in names if ("jobs", "default", n) in created_at)
        if cap > 0:
            # Everyone else should be Queued with a position.
            wait_for(lambda: sum(1 for pj in cluster.list(*PJ, "default")
                                 if (pj.get("status") or {}).get("phase") == "Queued") == count - expected,
                     timeout=120, what="the queue")
        time.sleep(1.0)
        ops = cluster.operator_requests(mark)
        return {
            "resources": count,
            "cap": cap,
            "jobs_created": len(latencies),
            "creation_to_job_seconds": {
                "median": round(statistics.median(latencies), 3),
                "p90": round(latencies[int(0.9 * (len(latencies) - 1))], 3),
                "max": round(latencies[-1], 3),
                "min": round(latencies[0], 3),
            },
            "wall_seconds_until_last_job": round(all_jobs, 3),
            # CPU seconds during the burst: the fake API server's thread, and the operator process.
            "cpu_seconds": {"fake_apiserver": round(cluster.server_cpu_seconds() - server_cpu_before, 2),
                            "operator": round(process_cpu_seconds(proc.pid) - operator_cpu_before, 2)},
            "requests_served": len(cluster.requests) - mark,
            "operator_requests": cluster.requests_by_verb(ops),
            "operator_peak_rss_mib": {"idle_after_startup": round(idle_hwm / 1024, 1),
                                      "after_burst": round(vm_hwm_kib(proc.pid) / 1024, 1)},
            "violations": cluster.violations,
        }
    finally:
        stop_operator(proc)


def never_starting(cluster: FakeCluster, workdir: Path) -> dict:
    proc = start_operator(cluster, workdir, {"PJ_MAX_CONCURRENT_JOBS": "1", "PJ_POLL_INTERVAL": "10"})
    try:
        cluster.create(pj_manifest("stuck"))
        wait_for(lambda: cluster.job("stuck"), what="the stuck job's Job")
        cluster.create(pj_manifest("waiting"))
        wait_for(lambda: (cluster.pj("waiting").get("status") or {}).get("phase") == "Queued", what="the queue")
        cluster.start_pod("stuck")
        cluster.pod_waiting("stuck", "CreateContainerConfigError", 'secret "s3-credz" not found')
        stuck_at = time.monotonic()
        wait_for(lambda: (cluster.pj("stuck").get("status") or {}).get("phase") == "Failed", timeout=300,
                 what="Failed")
        failed_after = time.monotonic() - stuck_at
        wait_for(lambda: cluster.job("waiting"), timeout=300, what="the next job admitted")
        admitted_after = time.monotonic() - stuck_at
        reason = next(c["reason"] for c in cluster.pj("stuck")["status"]["conditions"] if c["type"] == "Failed")
        return {"settings": {"poll_interval_seconds": 10, "start_failure_grace_seconds": 60},
                "failed_reason": reason, "seconds_to_failed": round(failed_after, 1),
                "seconds_to_next_job_created": round(admitted_after, 1),
                "job_deleted": cluster.job("stuck") is None, "violations": cluster.violations}
    finally:
        stop_operator(proc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--cap", type=int, default=20,
                        help="also run the burst with PJ_MAX_CONCURRENT_JOBS=cap (0: skip that run)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--skip-start-failure", action="store_true", help="skip measurement 3 (about 70 s)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        cluster = FakeCluster().start()
        try:
            lifecycle = lifecycle_requests(cluster, workdir)
        finally:
            cluster.stop()
        cluster = FakeCluster().start()
        try:
            load = burst(cluster, workdir, args.count, 0)
        finally:
            cluster.stop()
        capped = None
        if args.cap > 0:
            cluster = FakeCluster().start()
            try:
                capped = burst(cluster, workdir, args.count, args.cap)
            finally:
                cluster.stop()
        start_failure = None
        if not args.skip_start_failure:
            cluster = FakeCluster().start()
            try:
                start_failure = never_starting(cluster, workdir)
            finally:
                cluster.stop()

    result = {
        "world": None,  # no tiny world: the operator alone
        "what": "personalization-operator against the strict fake API server (kmock 0.8 + schema validation)",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_start": os.getloadavg()},
        "lifecycle": lifecycle,
        "queue_pump_per_tick": "1 list personalizationjobs (per watched namespace) + 1 list priorityclasses "
                               "when a cap is set and jobs wait + per namespace with admitted, unfinished jobs: "
                               "1 list jobs, 1 list pods, and 1 list Warning events while one of them is Pending",
        "burst": load,
        # With a cap, every create handler lists all resources (and PriorityClasses) to place itself
        # in the queue: O(N) per decision. Latencies here are for the first `cap` admitted.
        "burst_with_cap": capped,
        "never_starting_pod": start_failure,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
