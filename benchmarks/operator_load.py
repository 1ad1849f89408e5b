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
the numbers are upper bounds for a quiet machine. These three measurements are of solo jobs
(PJ_PACKING_ENABLED=false).

4. With --placement: packed against solo placement (docs/operator.md, "Packing"). N compatible
   Textual Inversion jobs (default 200) across several namespaces (default 4), created at once,
   with the operator's defaults (packs of 8, 30 s collecting time, 10 s pump) and no cap. A fake
   kubelet starts every Job's pod as soon as the Job exists; a fake trainer reports each member's
   first step as soon as its pod runs and it is in the pod's --jobs folder (or its own Job), then
   every member finishes and every Job completes. Reported: Jobs and pods created, seconds from
   each resource's creation to its first step (what the operator adds: admission, the collecting
   time, refills; no image pull or model load), and the operator's API requests per member, events
   not counted, the pump's included.

    python benchmarks/operator_load.py --placement [--count 200] [--namespaces 4]

writes benchmarks/results/operator_packing.json and .md.
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
PACKING_RESULTS = ROOT / "benchmarks" / "results" / "operator_packing.json"


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
        "PJ_PACKING_ENABLED": "false",
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


# ---- 4. packed against solo placement -------------------------------------------------------------


async def _create_spread(cluster: FakeCluster, manifests: list[dict]) -> None:
    async def one(manifest: dict):
        path = f"/apis/personalization.dvar.dev/v1alpha1/namespaces/{manifest['metadata']['namespace']}" \
               "/personalizationjobs"
        response = await cluster.server.post(path, json=manifest)
        if response.status not in (200, 201):
            raise RuntimeError(f"create failed: HTTP {response.status}: {await response.text()}")

    await asyncio.gather(*(one(m) for m in manifests))


def _percentiles(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {"median": round(statistics.median(values), 2), "p90": round(values[int(0.9 * (len(values) - 1))], 2),
            "max": round(values[-1], 2), "min": round(values[0], 2)}


class FakeNodes:
    """The kubelet and the trainer, for every Job of the operator: a Job's pod starts and runs at
    once; the trainer reports step 1 of each member it sees (its --jobs folder or its own job)."""

    def __init__(self, cluster: FakeCluster, namespaces: list[str]):
        self.cluster = cluster
        self.namespaces = namespaces
        self.running: dict[tuple[str, str], bool] = {}
        self.first_step: dict[tuple[str, str], float] = {}

    def members(self, namespace: str, job: dict) -> list[str]:
        pack = job["metadata"]["labels"].get("personalization.dvar.dev/pack")
        return self.cluster.pack_files(pack, namespace) if pack else [job["metadata"]["name"]]

    def step(self) -> None:
        for namespace in self.namespaces:
            for job in self.cluster.list("batch/v1", "Job", namespace):
                key = (namespace, job["metadata"]["name"])
                if key not in self.running:
                    self.cluster.start_pod(key[1], namespace)
                    self.cluster.pod_running(key[1], namespace)
                    self.running[key] = True
                for member in self.members(namespace, job):
                    if (namespace, member) not in self.first_step:
                        self.cluster.member_trains(member, 1, namespace)
                        self.first_step[(namespace, member)] = time.monotonic()

    def finish_all(self) -> None:
        for (namespace, member) in self.first_step:
            self.cluster.member_finishes(member, step=180, namespace=namespace)
        for namespace, job in self.running:
            self.cluster.job_succeeded(job, namespace)


def placement(cluster: FakeCluster, workdir: Path, count: int, namespaces: int, packing: bool) -> dict:
    proc = start_operator(cluster, workdir, {"PJ_PACKING_ENABLED": str(packing).lower(),
                                             "PJ_MAX_CONCURRENT_JOBS": "0", "PJ_POLL_INTERVAL": "10"})
    spaces = [f"team-{i}" for i in range(namespaces)]
    cluster.server.namespaces |= set(spaces)
    nodes = FakeNodes(cluster, spaces)
    try:
        names = [(spaces[i % namespaces], f"concept-{i:03d}") for i in range(count)]
        mark = len(cluster.requests)
        started = time.monotonic()
        future = asyncio.run_coroutine_threadsafe(_create_spread(cluster, [pj_manifest(n, ns) for ns, n in names]),
                                                  cluster._loop)
        future.result(timeout=300)

        def all_stepped() -> bool:
            nodes.step()
            return len(nodes.first_step) >= count

        wait_for(all_stepped, timeout=900, what="every member's first step")
        created = cluster.server.created_at
        to_first_step = [nodes.first_step[(ns, n)] - created[("personalizationjobs", ns, n)] for ns, n in names]
        nodes.finish_all()
        wait_for(lambda: all((cluster.pj(n, ns).get("status") or {}).get("phase") == "Succeeded" for ns, n in names),
                 timeout=600, what="every member Succeeded")
        time.sleep(2.0)  # the last watch events drain through the operator
        ops = [r for r in cluster.operator_requests(mark) if r.resource is None or r.resource.plural != "events"]
        by_verb = cluster.requests_by_verb(ops)
        return {
            "placement": "packed" if packing else "solo",
            "jobs": len(cluster.creations("jobs")),
            "pods": len(cluster.creations("pods")),
            "seconds_to_first_step": _percentiles(to_first_step),
            "operator_requests_per_member": round(sum(by_verb.values()) / count, 2),
            "operator_requests": by_verb,
            "wall_seconds": round(time.monotonic() - started, 1),
            "operator_peak_rss_mib": round(vm_hwm_kib(proc.pid) / 1024, 1),
            "violations": cluster.violations,
        }
    finally:
        stop_operator(proc)


def placement_report(result: dict) -> str:
    rows = ["| placement | Jobs | pods | s to first step: median | p90 | max | API requests per member |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for run in result["runs"]:
        t = run["seconds_to_first_step"]
        rows.append(f"| {run['placement']} | {run['jobs']} | {run['pods']} | {t['median']} | {t['p90']} | {t['max']} "
                    f"| {run['operator_requests_per_member']} |")
    return "\n".join([
        "# Packed against solo placement (operator only)",
        "",
        f"{result['count']} compatible Textual Inversion PersonalizationJobs across {result['namespaces']} namespaces, "
        "created at once, on the strict fake API server; the operator's defaults (packs of 8, 30 s collecting "
        "time, 10 s pump), no concurrency cap. Pods start the moment their Job exists and the fake trainer "
        "reports a member's first step as soon as it sees the member: the seconds below are what the "
        "operator adds (admission, collecting, refill), not image pulls or model loads. Requests: the "
        "operator's, from the first creation until every member Succeeded, events not counted, the pump's "
        "listings included.",
        "",
        *rows,
        "",
        f"Command: `{result['command']}`. Machine: {result['machine']['cpus']} shared CPUs, load average "
        f"{result['machine']['load_average_at_start'][0]:.1f} at the start.",
        "",
    ])


def main_placement(args: argparse.Namespace) -> int:
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for packing in (True, False):
            cluster = FakeCluster().start()
            try:
                runs.append(placement(cluster, Path(tmp), args.count, args.namespaces, packing))
            finally:
                cluster.stop()
    result = {
        "world": None,  # no tiny world: the operator alone
        "what": "packed against solo placement, personalization-operator against the strict fake API server",
        "command": f"python benchmarks/operator_load.py --placement --count {args.count} --namespaces {args.namespaces}",
        "count": args.count, "namespaces": args.namespaces,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_start": os.getloadavg()},
        "runs": runs,
    }
    PACKING_RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    PACKING_RESULTS.with_suffix(".md").write_text(placement_report(result))
    print(placement_report(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--cap", type=int, default=20,
                        help="also run the burst with PJ_MAX_CONCURRENT_JOBS=cap (0: skip that run)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--skip-start-failure", action="store_true", help="skip measurement 3 (about 70 s)")
    parser.add_argument("--placement", action="store_true",
                        help="only measurement 4: packed against solo placement (operator_packing.json)")
    parser.add_argument("--namespaces", type=int, default=4, help="namespaces of the --placement jobs")
    args = parser.parse_args(argv)
    if args.placement:
        return main_placement(args)

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
