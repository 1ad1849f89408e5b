"""The README's demo figures, measured: `bash demo.sh` timed from start to end, its stop, what
tracking cost (the stage's own seconds from result.json) and the closing CLIP-I line.

    python benchmarks/demo_run.py [--runs 3]

Runs the demo as a user does, in the checkout (it writes demo-output/), so the installs are
already cached after the first run; the wall time is the median over --runs, with the load
average beside it (other jobs on the machine stretch it). Writes benchmarks/results/demo.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

from personalize.world.provenance import installed_world

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CLIP_LINE = re.compile(r"CLIP-I to the concept photos: before (\d\.\d+), after (\d\.\d+)")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def run_demo() -> dict:
    started = time.monotonic()
    done = subprocess.run(["bash", str(ROOT / "demo.sh")], cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"demo.sh failed (exit {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    clip = CLIP_LINE.search(done.stdout)
    if clip is None:
        raise SystemExit(f"demo.sh printed no CLIP-I line:\n{done.stdout[-2000:]}")
    result = json.loads((ROOT / "demo-output" / "result.json").read_text())
    (stage,) = result["stages"]
    return {"wall_seconds": round(wall, 1), "load_average_after": round(os.getloadavg()[0], 2),
            "stop_step": stage["stopStep"], "max_steps": stage["maxSteps"], "reason": stage["reason"],
            "stage_seconds": stage["seconds"], "tracking_seconds": stage["trackingSeconds"],
            "clip_i_before": float(clip.group(1)), "clip_i_after": float(clip.group(2))}


def markdown(report: dict) -> str:
    m = report["median"]
    lines = ["# The README's demo (`bash demo.sh`)", "",
             f"{report['machine']}; {len(report['runs'])} runs, installs cached; command `{report['command']}`.", "",
             f"Median: {m['wall_seconds']} s wall; stop at step {m['stop_step']} of {m['max_steps']}; evaluating the "
             f"stop signal took {m['tracking_seconds']} s of the stage's {m['stage_seconds']} s "
             f"({m['tracking_seconds'] / m['stage_seconds']:.0%}); CLIP-I before {m['clip_i_before']:.3f}, "
             f"after {m['clip_i_after']:.3f}.", "",
             "| run | wall s | load average after | stop | stage s | tracking s | CLIP-I before | CLIP-I after |",
             "|---|---|---|---|---|---|---|---|"]
    for n, r in enumerate(report["runs"], 1):
        lines.append(f"| {n} | {r['wall_seconds']} | {r['load_average_after']} | {r['stop_step']} | {r['stage_seconds']} "
                     f"| {r['tracking_seconds']} | {r['clip_i_before']:.3f} | {r['clip_i_after']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    machine = f"{cpu_model()}, {os.cpu_count()} cores, load average at start {os.getloadavg()[0]:.2f}"
    runs = [run_demo() for _ in range(args.runs)]
    numbers = [k for k in runs[0] if k != "reason"]
    report = {
        "world": installed_world(),
        "command": "python benchmarks/demo_run.py" + (f" --runs {args.runs}" if args.runs != 3 else ""),
        "machine": machine,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "runs": runs,
        "median": {k: statistics.median(r[k] for r in runs) for k in numbers},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "demo.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "demo.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
