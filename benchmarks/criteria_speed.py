"""How fast are the streaming criteria? Time for 10^6 updates of each, window 310 (the Textual
Inversion default, evaluation every step), on a synthetic converging loss series.

For comparison, the O(history) rule the official DVAR code uses (np.var of the whole history at
every step) is timed on a shorter series: its cost per update grows linearly with the step.

    python benchmarks/criteria_speed.py [--updates N] [--window N]

Writes benchmarks/results/criteria_speed.json. Single-threaded, pure Python.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from personalize.criteria import make_criterion

RESULTS = Path(__file__).parent / "results" / "criteria_speed.json"
THRESHOLDS = {"dvar": 0.15, "ema": 0.01, "hall": 0.1, "trend": 1e-4, "none": 0.0}


def loss_series(n: int) -> list[float]:
    rng = np.random.default_rng(0)
    t = np.arange(n, dtype=float)
    return (0.1 + 0.4 * np.exp(-t / (n / 10)) + 1e-3 * rng.standard_normal(n)).tolist()


def time_criterion(name: str, values: list[float], window: int) -> float:
    crit = make_criterion(name, window, THRESHOLDS[name])
    update = crit.update
    start = time.perf_counter()
    for v in values:
        update(v)
    return time.perf_counter() - start


def time_naive_dvar(values: list[float], window: int) -> float:
    """The O(history) formulation: both variances recomputed from the full history each step."""
    arr = np.asarray(values)
    start = time.perf_counter()
    for t in range(window, len(arr) + 1):
        h = arr[:t]
        _ = np.var(h[-window:]) / np.var(h)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=1_000_000)
    parser.add_argument("--window", type=int, default=310)
    parser.add_argument("--naive-updates", type=int, default=20_000)
    args = parser.parse_args()

    values = loss_series(args.updates)
    result: dict = {
        "world": None,  # no tiny world: a synthetic loss series
        "updates": args.updates,
        "window": args.window,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "criteria": {},
    }
    for name in ("dvar", "ema", "hall", "trend", "none"):
        seconds = time_criterion(name, values, args.window)
        result["criteria"][name] = {
            "seconds": round(seconds, 3),
            "microseconds_per_update": round(1e6 * seconds / args.updates, 3),
        }
        print(f"{name:6s} {seconds:7.3f} s for {args.updates} updates ({1e6 * seconds / args.updates:.2f} us/update)")

    naive_n = args.naive_updates
    naive = time_naive_dvar(values[:naive_n], args.window)
    streaming = time_criterion("dvar", values[:naive_n], args.window)
    result["naive_dvar"] = {
        "updates": naive_n,
        "seconds": round(naive, 3),
        "streaming_seconds_same_series": round(streaming, 4),
        "note": "np.var over the whole history at every step (cost grows with the step)",
    }
    print(f"naive dvar: {naive:.3f} s for {naive_n} updates vs streaming {streaming:.4f} s")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
