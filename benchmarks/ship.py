"""Shipping numbers: how long the Helm chart takes to render and lint (helm-python-sdk, offline),
how many objects it renders (defaults and every option on), and how long after the trainer's
first step a real Prometheus (1 s scrape interval) had its first sample.

    python benchmarks/ship.py [--repeats N] [--live-runs N]

Writes benchmarks/results/ship.json. The live part needs Debian's prometheus package and runs
the real tiny `personalize-train` (see tests/ship/live_session.py); --live-runs 0 skips it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "ship"))

import helm_python  # noqa: E402

from ship_helpers import ALL_ON, CHART, NAMESPACE, manifests, render  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "ship.json"


def timed(fn, repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_ms": round(1000 * statistics.median(times), 2), "min_ms": round(1000 * min(times), 2),
            "max_ms": round(1000 * max(times), 2), "repeats": repeats}


def chart_numbers(repeats: int) -> dict:
    out = {}
    for label, values in (("defaults", None), ("all_on", ALL_ON)):
        objects = manifests(render(values))
        out[label] = {
            "objects": len(objects),
            "by_kind": dict(sorted(Counter(o["kind"] for o in objects).items())),
            # load + render, as `helm template` does
            "render": timed(lambda: render(values), repeats),
            "lint": timed(lambda: helm_python.lint(str(CHART), values, strict=True, namespace=NAMESPACE), repeats),
        }
    return out


def live_numbers(runs: int) -> dict:
    import live_session
    from prom_harness import PROMETHEUS

    if runs <= 0:
        return {"skipped": "--live-runs 0"}
    if PROMETHEUS is None:
        return {"skipped": "prometheus is not installed"}
    samples = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            session = live_session.start(Path(tmp))
            try:
                assert session.trainer_returncode == 0, session.trainer_log[-2000:]
                samples.append({
                    # wall clock: first step visible on the trainer's /metrics -> first query
                    # answer from Prometheus containing it
                    "first_step_to_queryable_s": round(session.first_sample_wall - session.first_step_wall, 3),
                    # the stored sample's own timestamp vs the first step (scrape phase)
                    "first_step_to_sample_timestamp_s": round(session.first_sample_timestamp - session.first_step_wall, 3),
                    "trainer_wall_seconds": round(session.trainer_wall_seconds, 1),
                })
            finally:
                session.close()
    lat = [s["first_step_to_queryable_s"] for s in samples]
    return {
        "scrape_interval_s": 1,
        "observation_poll_s": 0.05,
        "runs": samples,
        "first_step_to_queryable_s": {"median": round(statistics.median(lat), 3), "max": round(max(lat), 3)},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--live-runs", type=int, default=3)
    args = parser.parse_args()
    result = {
        "world": None,  # no tiny world: the chart and a live Prometheus
        "machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count(),
                    "helm_sdk": helm_python.helm_sdk_version()},
        "chart": chart_numbers(args.repeats),
        "prometheus": live_numbers(args.live_runs),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
