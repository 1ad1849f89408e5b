"""`personalize-train --config FILE --output DIR [--metrics-port N]`: run one PersonalizationJob.

Writes into DIR: the method's artifact(s), `losses.csv`, `convergence.png`, `samples.png` and
`result.json` (the trainer's status fields, `TrainerReport.to_api()`); serves /metrics while
running and patches the resource's status when the environment names it (PJ_NAMESPACE/PJ_NAME).
Bad input ends with one line `error: ...` on stderr and exit code 2. SIGTERM/SIGINT: the run
saves a checkpoint after the current step and exits 143; the same command resumes it.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from personalize.errors import TrainerInputError
from personalize.preflight import preflight
from personalize.shutdown import INTERRUPTED_EXIT_CODE, GracefulShutdown, TrainingInterrupted
from personalize.spec import SpecError, load_job

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
LOSSES_HEADER = ("step", "train_loss", "deterministic_loss", "convergence_value")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="personalize-train", description="Run one PersonalizationJob locally.")
    parser.add_argument("--config", required=True, help="PersonalizationJob manifest or its spec (YAML/JSON)")
    parser.add_argument("--output", required=True, help="output directory (artifacts, result.json, plots)")
    parser.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    parser.add_argument(
        "--metrics-linger", type=float, default=0.0, metavar="SECONDS",
        help="keep serving /metrics this long after the final values, so a scrape sees the decision",
    )
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        job = load_job(args.config)
        if job.spec.output.uri:  # an earlier attempt trained but could not upload: only upload
            from personalize.storage.publish import retry_pending_upload

            retried = retry_pending_upload(job, Path(args.output), write_json)
            if retried is not None:
                return retried
        output = preflight(job, args.output)
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


def write_losses_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(LOSSES_HEADER)
        for row in rows:
            writer.writerow(["" if row.get(k) is None else row[k] for k in LOSSES_HEADER])


def write_json(data: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)

