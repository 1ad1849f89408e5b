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

5. With --scale LABEL: steady state at scale (issue 32, point 13). N solo jobs (--count, e.g. 2000)
   across M namespaces (--namespaces, e.g. 200), all Running: the harness writes the cluster as the
   operator would have left it (each resource admitted, its Job built by the operator's own
   builder, its pod running), then starts the operator with its defaults (10 s pump) and no cap.
   After start-up settles, the operator's API requests are counted over --window seconds (by verb
   and resource; the rate is per minute) and its resident memory (VmRSS, VmHWM) read. Then one
   more job's pod can never start (CreateContainerConfigError, the default 60 s grace): seconds
   from the pod getting stuck to the resource's Failed phase.

    python benchmarks/operator_load.py --scale before --count 2000 --namespaces 200

merges its run under LABEL into benchmarks/results/operator_scale.json and rewrites the .md.
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
SCALE_RESULTS = ROOT / "benchmarks" / "results" / "operator_scale.json"


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def start_operator(cluster: FakeCluster, workdir: Path, env_extra: dict[str, str],
                   timeout: float = 60.0) -> subprocess.Popen:
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
    wait_for(lambda: cluster.watching("personalizationjobs") and cluster.watching("jobs"), timeout=timeout,
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


# ---- 5. steady state at scale ----------------------------------------------------------------------


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def populate_running(cluster: FakeCluster, jobs: list[tuple[str, str]]) -> None:
    """Write each resource as admitted and Running, its Job as the operator builds it, its pod
    running: the state a busy cluster is in, without waiting for thousands of admissions."""
    from pj_operator import children, names as pj_names
    from pj_operator.settings import Settings
    from pj_operator.validation import parse_body
    import kopf

    settings = Settings()
    for namespace, name in jobs:
        pj = cluster.create(pj_manifest(name, namespace))
        job_name = pj_names.job_name(name)
        job = next(m for m in children.all_children(parse_body(pj), name, namespace, settings) if m["kind"] == "Job")
        kopf.append_owner_reference(job, owner=pj)
        cluster.create(job)
        started = "2026-01-01T00:00:00Z"
        message = f"Job {job_name} is running"
        cluster.patch_status(*PJ, namespace, name, {
            "phase": "Running", "jobName": job_name, "startTime": started, "attempts": 1,
            "observedGeneration": pj["metadata"].get("generation"),
            "conditions": [
                {"type": "Valid", "status": "True", "reason": "Validated", "message": "spec is valid",
                 "lastTransitionTime": started},
                {"type": "Running", "status": "True", "reason": "PodRunning", "message": message,
                 "lastTransitionTime": started}]})
        cluster.start_pod(job_name, namespace)
        cluster.pod_running(job_name, namespace)


def _settle(cluster: FakeCluster, since: int, resources: int, quiet: float, timeout: float) -> float:
    """Wait until kopf has taken up every resource (its first handling patches each one's
    annotations), then until the operator sent no write (create, patch, delete) for `quiet` s."""
    started = time.monotonic()

    def taken_up() -> bool:
        return sum(1 for r in cluster.operator_requests(since)
                   if r.action is not None and r.action.name == "UPDATE" and r.resource is not None
                   and r.resource.plural == "personalizationjobs" and not r.subresource) >= resources

    wait_for(taken_up, timeout=timeout, what="every resource taken up by the operator")
    while time.monotonic() - started < timeout:
        mark = len(cluster.requests)
        time.sleep(quiet)
        writes = [r for r in cluster.operator_requests(mark)
                  if r.action is not None and r.action.name in ("CREATE", "UPDATE", "DELETE")]
        if not writes:
            break
    return round(time.monotonic() - started, 1)


def scale(cluster: FakeCluster, workdir: Path, count: int, namespaces: int, window: float) -> dict:
    spaces = [f"team-{i:03d}" for i in range(namespaces)]
    cluster.server.namespaces |= set(spaces)
    jobs = [(spaces[i % namespaces], f"concept-{i:04d}") for i in range(count)]
    began = time.monotonic()
    populate_running(cluster, jobs)
    populated = time.monotonic() - began
    began = time.monotonic()
    since = len(cluster.requests)
    # kopf lists every kind before it watches any: thousands of objects take a while.
    proc = start_operator(cluster, workdir, {"PJ_MAX_CONCURRENT_JOBS": "0", "PJ_POLL_INTERVAL": "10"}, timeout=600)
    watching = time.monotonic() - began
    try:
        settle_seconds = _settle(cluster, since, count, quiet=15.0, timeout=900.0)
        mark = len(cluster.requests)
        server_cpu = cluster.server_cpu_seconds()
        operator_cpu = process_cpu_seconds(proc.pid)
        # The operator's CPU in four slices of the window: a backlog left from start-up would
        # show as a falling series, a steady cost as a flat one.
        slices = []
        for _ in range(4):
            before = process_cpu_seconds(proc.pid)
            time.sleep(window / 4)
            slices.append(round((process_cpu_seconds(proc.pid) - before) * 60.0 / (window / 4), 2))
        ops = cluster.operator_requests(mark)
        by_verb = cluster.requests_by_verb(ops)
        per_minute = {k: round(v * 60.0 / window, 1) for k, v in by_verb.items()}
        steady = {
            "window_seconds": window,
            "requests_per_minute": round(sum(by_verb.values()) * 60.0 / window, 1),
            "list_requests_per_minute": round(sum(v for k, v in by_verb.items() if k.startswith("list ")) * 60.0
                                              / window, 1),
            "requests_per_minute_by_verb_and_resource": per_minute,
            "cpu_seconds_per_minute": {
                "operator": round((process_cpu_seconds(proc.pid) - operator_cpu) * 60.0 / window, 2),
                "fake_apiserver": round((cluster.server_cpu_seconds() - server_cpu) * 60.0 / window, 2),
                "operator_by_quarter_of_the_window": slices},
            "operator_rss_mib": round(vm_rss_kib(proc.pid) / 1024, 1),
            "operator_peak_rss_mib": round(vm_hwm_kib(proc.pid) / 1024, 1),
        }
        # A pod that can never start, among all the others.
        stuck = ("team-000" if namespaces else "default", "stuck")
        cluster.create(pj_manifest(stuck[1], stuck[0]))
        wait_for(lambda: cluster.job(stuck[1], stuck[0]), timeout=300, what="the stuck job's Job")
        cluster.start_pod(stuck[1], stuck[0])
        cluster.pod_waiting(stuck[1], "CreateContainerConfigError", 'secret "s3-credz" not found', stuck[0])
        stuck_at = time.monotonic()
        wait_for(lambda: (cluster.pj(stuck[1], stuck[0]).get("status") or {}).get("phase") == "Failed",
                 timeout=400, what="Failed")
        failed_after = time.monotonic() - stuck_at
        reason = next(c["reason"] for c in cluster.pj(stuck[1], stuck[0])["status"]["conditions"]
                      if c["type"] == "Failed")
        return {
            "count": count, "namespaces": namespaces,
            "seconds_to_populate": round(populated, 1), "seconds_to_watch": round(watching, 1),
            "seconds_to_settle": settle_seconds,
            "steady_state": steady,
            "never_starting_pod": {"settings": {"poll_interval_seconds": 10, "start_failure_grace_seconds": 60},
                                   "failed_reason": reason, "seconds_to_failed": round(failed_after, 1),
                                   "job_deleted": cluster.job(stuck[1], stuck[0]) is None},
            "operator_peak_rss_mib_at_end": round(vm_hwm_kib(proc.pid) / 1024, 1),
            "violations": cluster.violations,
        }
    finally:
        stop_operator(proc)


def scale_report(result: dict) -> str:
    runs = result["runs"]
    labels = list(runs)
    rows = ["| | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]

    def row(title: str, get) -> None:
        rows.append(f"| {title} | " + " | ".join(str(get(runs[label])) for label in labels) + " |")

    row("jobs / namespaces", lambda r: f"{r['count']} / {r['namespaces']}")
    row("API requests per minute, steady state", lambda r: r["steady_state"]["requests_per_minute"])
    row("of which LIST", lambda r: r["steady_state"]["list_requests_per_minute"])
    row("operator CPU seconds per minute", lambda r: r["steady_state"]["cpu_seconds_per_minute"]["operator"])
    row("the same, by quarter of the window", lambda r: " / ".join(
        str(v) for v in r["steady_state"]["cpu_seconds_per_minute"].get("operator_by_quarter_of_the_window", ["-"])))
    row("operator RSS, MiB (peak)", lambda r: f"{r['steady_state']['operator_rss_mib']} "
                                              f"({r['operator_peak_rss_mib_at_end']})")
    row("s until a pod that can never start is Failed", lambda r: r["never_starting_pod"]["seconds_to_failed"])
    detail = []
    for label in labels:
        by = runs[label]["steady_state"]["requests_per_minute_by_verb_and_resource"]
        detail.append(f"- {label}: " + (", ".join(f"{k} {v}" for k, v in by.items()) or "none"))
        ticks = by.get("list personalizationjobs", 0.0)  # a listing pump lists them once per tick
        if ticks:
            detail.append(f"  (a tick lists every kind: {ticks:g} ticks a minute, one every {60 / ticks:.0f} s "
                          f"against the 10 s interval, so the listings are bounded by how fast the fake API "
                          f"server answers them; a faster server gets more)")
    return "\n".join([
        "# The operator at steady state, at scale",
        "",
        "Solo jobs, all Running, spread evenly over the namespaces, on the strict fake API server; the "
        "operator with its defaults (10 s pump, 60 s start-failure grace, 300 s watch timeout), no concurrency cap; "
        "a watch that starts again after its timeout resumes from the last version it saw, as on a real API server "
        "(kmock alone would resend every object, so runs before 2026-12-07 counted that replay's CPU). Requests: the "
        "operator's, over a window after start-up settled (kopf took up every resource, then no write for 15 s), per minute. The never-starting "
        "pod: CreateContainerConfigError (a missing Secret) on one more job, seconds from the pod's waiting "
        "state to the resource's Failed phase (the grace is 60 s of it).",
        "",
        *rows,
        "",
        "Requests per minute by verb and resource:",
        "",
        *detail,
        "",
        *[f"{label}: `{runs[label]['command']}` at commit {runs[label]['commit']}; machine "
          f"{runs[label]['machine']['cpus']} shared CPUs, load average "
          f"{runs[label]['machine']['load_average_at_start'][0]:.1f} at the start." for label in labels],
        "",
    ])


def main_scale(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        cluster = FakeCluster().start()
        # A watch that kopf starts again after its timeout resumes from the version it saw, as
        # on a real API server: kmock would replay every object (thousands) through the handlers.
        cluster.server.watches_resume = True
        try:
            run = scale(cluster, Path(tmp), args.count, args.namespaces, args.window)
        finally:
            cluster.stop()
    # A run of an exported tree (git archive, no .git) names its commit in PJ_BENCH_COMMIT.
    commit = os.environ.get("PJ_BENCH_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    run.update({
        "command": f"python benchmarks/operator_load.py --scale {args.scale} --count {args.count} "
                   f"--namespaces {args.namespaces} --window {args.window:g}",
        "commit": commit or None,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "load_average_at_start": os.getloadavg()},
    })
    result = json.loads(SCALE_RESULTS.read_text()) if SCALE_RESULTS.exists() else {}
    result.update({"world": None,  # no tiny world: the operator alone
                   "what": "the operator at steady state with many running jobs, against the strict fake API server"})
    result.setdefault("runs", {})[args.scale] = run
    SCALE_RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    SCALE_RESULTS.with_suffix(".md").write_text(scale_report(result))
    print(scale_report(result))
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
    parser.add_argument("--namespaces", type=int, default=4, help="namespaces of the --placement and --scale jobs")
    parser.add_argument("--scale", metavar="LABEL",
                        help="only measurement 5: steady state with --count running jobs across --namespaces "
                             "namespaces, stored under LABEL (e.g. before, after) in operator_scale.json")
    parser.add_argument("--window", type=float, default=120.0,
                        help="seconds of steady state over which --scale counts requests")
    args = parser.parse_args(argv)
    if args.placement:
        return main_placement(args)
    if args.scale:
        return main_scale(args)

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
