"""`kubectl get pj`: what a user sees of a running and a finished job in 120 columns."""

from __future__ import annotations

import datetime

from kubectl_table import render
from pj_operator import crdgen

NOW = datetime.datetime(2025, 1, 1, 12, 0, tzinfo=datetime.timezone.utc)


def job(name: str, status: dict, minutes_ago: int, method: str = "textualInversion") -> dict:
    created = (NOW - datetime.timedelta(minutes=minutes_ago)).isoformat().replace("+00:00", "Z")
    return {"metadata": {"name": name, "creationTimestamp": created}, "spec": {"method": method}, "status": status}


RUNNING = job("cat-toy-ti", {
    "phase": "Running", "identifier": "<cat-toy>", "convergenceValue": 0.4127, "convergenceThreshold": 0.15,
    "progress": {"step": 186400, "maxSteps": 610000, "percent": 14.16, "etaSeconds": 2912.4, "elapsed": "0:08:14",
                 "eta": "0:48:32"},
    "jobName": "cat-toy-ti-trainer",
}, 9)
FINISHED = job("backpack-lora-r16", {
    "phase": "Succeeded", "identifier": "sks", "convergenceValue": 0.1392, "convergenceThreshold": 0.15,
    "progress": {"step": 288, "maxSteps": 1000, "percent": 28.8, "elapsed": "0:04:51"},
    "earlyStop": {"stopped": True, "reason": "ConvergenceThreshold", "threshold": 0.15, "step": 288},
    "samples": "samples/step-00288.png", "jobName": "backpack-lora-r16-trainer",
}, 31, method="lora")


def columns():
    return crdgen.build_crd()["spec"]["versions"][0]["additionalPrinterColumns"]


def test_the_default_listing_fits_120_columns_with_token_elapsed_eta_and_the_threshold():
    listing = render(columns(), [RUNNING, FINISHED], now=NOW)
    header, running, finished = listing.splitlines()
    assert max(len(line) for line in listing.splitlines()) <= 120, listing
    names = header.split()
    # the threshold sits right after the value it is compared with
    assert names[names.index("CONV") + 1] == "THRESHOLD"
    assert {"TOKEN", "ELAPSED", "ETA"} <= set(names) and "METHOD" not in names
    assert "186400" in running and "<cat-toy>" in running and "0:48:32" in running and "0:08:14" in running
    # a finished job: where it stopped and why, and no ETA left behind
    eta = slice(header.index("ETA"), header.index("STOP REASON"))
    assert finished[eta].strip() == "" and running[eta].strip() == "0:48:32"
    assert finished[header.index("STEP"):].startswith("288 ")
    assert "ConvergenceThreshold" in finished and "0:04:51" in finished


def test_wide_adds_the_method_the_budget_the_samples_and_the_job():
    wide = render(columns(), [RUNNING, FINISHED], wide=True, now=NOW)
    names = wide.splitlines()[0]
    for extra in ("METHOD", "MAX STEPS", "SAMPLES", "JOB"):
        assert extra in names
    assert "samples/step-00288.png" in wide and "textualInversion" in wide
