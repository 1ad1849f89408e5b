"""Exporters for the Prometheus integration test, each run as its own process:

    python metrics_drivers.py operator PORT
        The operator's real metrics modules (pj_operator.metrics, pack_metrics), served on PORT
        and fed the calls the operator makes during a lifecycle: phases observed, completions
        recorded (an early stop with steps saved, an OOM kill), concepts finished solo and in a
        pack, a handler raising.
    python metrics_drivers.py trainers HUNG_PORT BUDGET_PORT
        Two trainers' real metrics (personalize.metrics.TrainerMetrics) in situations a short
        live run cannot produce: `hung` stops advancing at step 5 of 100; `budget` runs all its
        steps with the convergence value above the threshold. They exist so every alert rule has
        something to find.
    python metrics_drivers.py dcgm PORT NAMESPACE POD
        A stand-in for DCGM exporter: its standard GPU series (DCGM_FI_DEV_GPU_UTIL,
        DCGM_FI_DEV_FB_USED) for one GPU in use by POD, labelled exported_namespace/exported_pod as
        a scrape that does not honour its labels leaves them.

Each prints "ready" once serving, then keeps serving until terminated.
"""

from __future__ import annotations

import sys
import threading
import time


def run_operator(port: int) -> None:
    from pj_operator import metrics, pack_metrics

    from pj_operator import job_table

    for uid, phase in [("a", "Running"), ("b", "Running"), ("c", "Queued"), ("d", "Pending"), ("e", "Succeeded")]:
        metrics.PHASES.observe(uid, phase)
    for name, namespace in (("cat-ti", "team-a"), ("dog-lora", "team-b")):  # the job table's rows
        job_table.JOBS.observe({
            "metadata": {"uid": name, "namespace": namespace, "name": name, "creationTimestamp": "2025-01-01T10:00:00Z"},
            "spec": {"method": "lora", "resources": {"gpus": 1}},
            "status": {"phase": "Succeeded", "identifier": "sks", "startTime": "2025-01-01T10:00:40Z",
                       "progress": {"step": 100, "maxSteps": 400},
                       "earlyStop": {"stopped": True, "reason": "ConvergenceThreshold", "step": 100, "stepsSaved": 300},
                       "stages": [{"seconds": 40.0, "trackingSeconds": 4.0}]},
        })
    metrics.serve(port)
    print("ready", flush=True)

    @metrics.counting_errors("on_create_or_resume")
    def failing_handler() -> None:
        raise RuntimeError("simulated API failure")

    finished = {
        "earlyStop": {"stopped": True, "reason": "ConvergenceThreshold", "step": 100, "stepsSaved": 300},
        "progress": {"step": 100, "maxSteps": 400},
        "wallSeconds": 50.0,
        "stages": [{"name": "textualInversion", "stopStep": 100, "seconds": 40.0, "trackingSeconds": 10.0}],
    }
    time.sleep(2)  # let Prometheus see the counters' absence first, as after an operator start
    for round_ in range(10_000):
        metrics.PHASES.observe(f"done-{round_}", "Succeeded")
        metrics.record_completion("Succeeded", "ConvergenceThreshold", "textualInversion", finished, gpus=1)
        # A solo concept and two packed ones (a pack's 300 GPU-seconds split 100:200 by steps).
        pack_metrics.CONCEPT_GPU_SECONDS.labels(packing="solo").observe(400.0)
        pack_metrics.CONCEPT_STEPS.labels(packing="solo").inc(100)
        for seconds, steps in ((100.0, 100), (200.0, 200)):
            pack_metrics.CONCEPT_GPU_SECONDS.labels(packing="packed").observe(seconds)
            pack_metrics.CONCEPT_STEPS.labels(packing="packed").inc(steps)
        if round_ == 0:
            metrics.PHASES.observe("f", "Failed")
            metrics.record_completion("Failed", "OOMKilled", "dreambooth", {}, gpus=1)
            try:
                failing_handler()
            except RuntimeError:
                pass
        time.sleep(2)


def run_trainers(hung_port: int, budget_port: int) -> None:
    from personalize.metrics import TrainerMetrics

    hung = TrainerMetrics("ship-test", "hung", "lora", "dvar")
    budget = TrainerMetrics("ship-test", "budget", "customDiffusion", "hall")
    hung.serve(hung_port, addr="127.0.0.1")
    budget.serve(budget_port, addr="127.0.0.1")
    for m in (hung, budget):
        m.set_early_stopped(False)
    print("ready", flush=True)

    def hung_job() -> None:
        for step in range(1, 6):
            hung.observe(step, 100, 0.9, 0.8 - 0.01 * step, None, 0.4, 0.1)
            time.sleep(0.2)

    def budget_job() -> None:
        for step in range(1, 41):
            value = 0.6 if step >= 10 else None  # defined once the window is full
            budget.observe(step, 40, 0.5, 0.45, value, 0.1, 0.05)
            time.sleep(0.1)

    threads = [threading.Thread(target=hung_job), threading.Thread(target=budget_job)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    threading.Event().wait()


def run_dcgm(port: int, namespace: str, pod: str) -> None:
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    registry = CollectorRegistry()
    labels = {"gpu": "0", "UUID": "GPU-0f1e2d3c", "Hostname": "gpu-node-1", "exported_namespace": namespace,
              "exported_pod": pod, "exported_container": "trainer"}
    Gauge("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", list(labels), registry=registry).labels(**labels).set(87)
    Gauge("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", list(labels), registry=registry).labels(
        **labels).set(10240)
    start_http_server(port, addr="127.0.0.1", registry=registry)
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    mode, *ports = sys.argv[1:]
    if mode == "operator":
        run_operator(int(ports[0]))
    elif mode == "trainers":
        run_trainers(int(ports[0]), int(ports[1]))
    elif mode == "dcgm":
        run_dcgm(int(ports[0]), ports[1], ports[2])
    else:
        sys.exit(f"unknown mode {mode!r}")
