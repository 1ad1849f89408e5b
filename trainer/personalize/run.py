"""`personalize-train --config FILE --output DIR [--metrics-port N]`: run one PersonalizationJob.

Writes into DIR: the method's artifact(s), `losses.csv`, `convergence.png`, `samples.png` and
`result.json` (the trainer's status fields, `TrainerReport.to_api()`); serves /metrics while
running and patches the resource's status when the environment names it (PJ_NAMESPACE/PJ_NAME).
Bad input ends with one line `error: ...` on stderr and exit code 2. `--num-processes N` runs N
data-parallel processes (launcher.py). SIGTERM/SIGINT: the run saves a checkpoint after the
current step and exits 143; the same command resumes it. A run that finished but could not write
its final status exits 3 (status_reporter.EXIT_STATUS_UNREPORTED).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from personalize.errors import TrainerInputError
from personalize.launcher import is_worker, launch
from personalize.preflight import preflight
from personalize.run_files import write_json
from personalize.shutdown import INTERRUPTED_EXIT_CODE, GracefulShutdown, TrainingInterrupted
from personalize.spec import SpecError, load_job

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="personalize-train", description="Run one PersonalizationJob locally.")
    parser.add_argument("--config", required=True, help="PersonalizationJob manifest or its spec (YAML/JSON)")
    parser.add_argument("--output", required=True, help="output directory (artifacts, result.json, plots)")
    parser.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    parser.add_argument(
        "--metrics-linger", type=float, default=0.0, metavar="SECONDS",
        help="keep serving /metrics this long after the final values, so a scrape sees the decision",
    )
    parser.add_argument(
        "--num-processes", type=int, default=1, metavar="N",
        help="data-parallel processes on this machine (one per GPU; gloo on CPU)",
    )
    args = parser.parse_args(argv)
    if args.num_processes < 1:
        parser.error("--num-processes must be at least 1")
    return args


def without_num_processes(argv: list[str]) -> list[str]:
    """The command line the launched processes run (they must not launch again)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--num-processes":
            skip = True
        elif not arg.startswith("--num-processes="):
            out.append(arg)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        job = load_job(args.config)
        if job.spec.output.uri:  # an earlier attempt trained but could not upload: only upload
            from personalize.storage.publish import retry_pending_upload

            retried = retry_pending_upload(job, Path(args.output), write_json)
            if retried is not None:
                return retried
        output = preflight(job, args.output)
        if args.num_processes > 1 and not is_worker():
            return launch(without_num_processes(argv), args.num_processes)
        # transformers logs import-time notices (e.g. optional image backends) that are noise here.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from personalize.job_runner import JobRunner  # heavy imports (torch, diffusers) only past input checks

        # SIGTERM (preemption) and SIGINT only set a flag: the loop checkpoints after its step.
        with GracefulShutdown() as shutdown:
            runner = JobRunner(job, output, metrics_port=args.metrics_port, metrics_linger=args.metrics_linger,
                               shutdown=shutdown)
            return runner.execute()
    except TrainingInterrupted as stop:
        # Not 0 (the Job would succeed and never resume) and not a failure: the pod's restart
        # resumes from the checkpoint (podFailurePolicy counts 143 as a retry).
        logging.getLogger("personalize").warning("%s", stop)
        return INTERRUPTED_EXIT_CODE
    except (TrainerInputError, SpecError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
