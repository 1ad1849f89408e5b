"""One run of benchmarks/gpu_check.sh: `personalize-train` with this script as each process, then
one JSON line with what the check prints (stop step, s/step, peak memory, precision, processes).

    python benchmarks/gpu_check_run.py --config JOB --output DIR --summary FILE [--num-processes N]

With `--num-processes N` it goes through the trainer's own launcher (the road `personalize-train
--num-processes N` and the operator take), which starts N copies of this script; each copy
trains through `personalize.run.main` and writes its peak memory to FILE.rank<R> as it ends.
The parent writes the summary once every process has exited, with the largest rank's peak.
Peak memory: torch.cuda.max_memory_allocated on a GPU, the peak resident set size on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from pathlib import Path


def peak_mib() -> float:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def summarize(output: Path, summary: Path) -> dict:
    result = json.loads((output / "result.json").read_text())
    peaks = [float(p.read_text()) for p in summary.parent.glob(f"{summary.name}.rank*")]
    stages = result.get("stages") or []
    steps = sum(s["stopStep"] for s in stages)
    seconds = sum(s["seconds"] for s in stages)
    return {
        "stop_step": result["earlyStop"]["step"],
        "reason": result["earlyStop"]["reason"],
        "seconds_per_step": seconds / steps if steps else None,
        "peak_mib": max(peaks) if peaks else None,
        "mixed_precision": result.get("mixedPrecision"),
        "processes": result.get("processes"),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--summary", required=True)
    parser.add_argument("--num-processes", type=int, default=1)
    args = parser.parse_args()
    from personalize.launcher import is_worker, launch
    from personalize.run import main as train

    summary = Path(args.summary)
    if not is_worker():  # a previous run's files; the launched copies leave them to this parent
        for stale in [summary, *summary.parent.glob(f"{summary.name}.rank*")]:
            stale.unlink(missing_ok=True)
    own = ["--config", args.config, "--output", args.output]
    if args.num_processes > 1 and not is_worker():
        code = launch([*own, "--summary", args.summary], args.num_processes,
                      command=[sys.executable, os.path.abspath(__file__)])
    else:
        code = train(own)
        Path(f"{summary}.rank{os.environ.get('RANK', '0')}").write_text(f"{peak_mib():.1f}\n")
        if is_worker():
            return code  # the launching parent writes the summary
    if code == 0:
        summary.write_text(json.dumps(summarize(Path(args.output), summary)) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
