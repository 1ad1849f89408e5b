"""One run of benchmarks/gpu_check.sh: `personalize-train` in this process, then one JSON line
with what the check prints (stop step, s/step, peak memory, precision, processes).

    python benchmarks/gpu_check_run.py --config JOB --output DIR [--summary FILE]

Under torchrun (several processes) each rank runs this script; rank 0 writes the summary, with
the peak memory of the largest rank (each rank appends its own peak to FILE.rank<N>).
Peak memory: torch.cuda.max_memory_allocated on a GPU, the peak resident set size on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch


def peak_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--summary", required=True)
    args = parser.parse_args()
    from personalize.run import main as train

    code = train(["--config", args.config, "--output", args.output])
    rank = int(os.environ.get("RANK", "0"))
    summary = Path(args.summary)
    Path(f"{summary}.rank{rank}").write_text(f"{peak_mib():.1f}\n")
    if code != 0 or rank != 0:
        return code
    time.sleep(1.0)  # the other ranks write their peaks as they exit (best effort)
    result = json.loads((Path(args.output) / "result.json").read_text())
    peaks = [float(p.read_text()) for p in summary.parent.glob(f"{summary.name}.rank*")]
    stages = result.get("stages") or []
    steps = sum(s["stopStep"] for s in stages)
    seconds = sum(s["seconds"] for s in stages)
    summary.write_text(json.dumps({
        "stop_step": result["earlyStop"]["step"],
        "reason": result["earlyStop"]["reason"],
        "seconds_per_step": seconds / steps if steps else None,
        "peak_mib": max(peaks) if peaks else peak_mib(),
        "mixed_precision": result.get("mixedPrecision"),
        "processes": result.get("processes"),
    }) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
