"""`personalize-train pack --jobs DIR --output OUT`: train many concepts in one process and one batch.

DIR holds PersonalizationJob manifests (`*.yaml`, `*.yml`, `*.json`; a mounted ConfigMap works: its
`..data` symlink swap is read like any other change). Each manifest is one member, named by its
`metadata.name`, and writes into OUT/NAME/ exactly what `personalize-train --config` writes.

    start         every manifest in DIR tries to join (up to --max-slots); the first one that can
                  fixes the pack's base model, family, precision and resolution
    each step     the slots train together (loop.py); a slot that stops leaves at that step and its
                  outputs are written as a solo run writes them; DIR is read again: a new manifest
                  joins when a slot is free, at its own step 0; a removed one leaves as Cancelled
    end           no slot trains and no new manifest came for --idle-exit seconds: exit 0

OUT/pack.json records each member (the pack step it joined and left at, its own steps, its stop
reason) and the pack's concept-steps, wall seconds and concept-steps per second. A manifest that
cannot join (another base model, family, precision or resolution, or a method that changes the
shared weights) gets OUT/NAME/result.json with phase Failed and a reason naming the difference;
bad input fails that member alone, with the error a solo run gives.

Resume: after SIGTERM or SIGKILL the same command continues every member from its own checkpoint
(OUT/NAME/checkpoints); a member whose result.json is final is not trained again.

Status: in a cluster (PJ_NAMESPACE set for the pod) each member's own resource is patched, and a
member of another namespace is refused: one tenant's pod never serves another's.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from personalize.pack_record import read_manifests

log = logging.getLogger("personalize")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="personalize-train pack",
                                     description="Train every PersonalizationJob manifest in a folder in one process and one batch.")
    parser.add_argument("--jobs", required=True, metavar="DIR", help="folder of PersonalizationJob manifests (read between steps)")
    parser.add_argument("--output", required=True, metavar="OUT", help="OUT/NAME/ per member, OUT/pack.json")
    parser.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics for the whole pack")
    parser.add_argument("--idle-exit", type=float, default=0.0, metavar="SECONDS",
                        help="exit 0 once no slot trains and no new manifest came for this long (default 0)")
    parser.add_argument("--max-slots", type=int, default=8, metavar="N", help="concepts training at once (default 8)")
    parser.add_argument("--metrics-linger", type=float, default=120.0, metavar="SECONDS",
                        help="a member's series stay on /metrics this long after it left, so a scrape sees its "
                             "decision (default 120)")
    args = parser.parse_args(argv)
    if args.max_slots < 1:
        parser.error("--max-slots must be at least 1")
    if args.idle_exit < 0:
        parser.error("--idle-exit must be >= 0")
    if args.metrics_linger < 0:
        parser.error("--metrics-linger must be >= 0")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    from personalize.shutdown import INTERRUPTED_EXIT_CODE, GracefulShutdown, TrainingInterrupted  # noqa: PLC0415

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    folder = Path(args.jobs)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun / accelerate launch: every rank would train every member
        print("error: personalize-train pack runs in one process (WORLD_SIZE is "
              f"{os.environ['WORLD_SIZE']}); data-parallel jobs run solo with --config", file=sys.stderr)
        return 2
    try:
        read_manifests(folder)
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from personalize.packing import PackRunner  # noqa: PLC0415 (heavy imports past the input checks)

    with GracefulShutdown() as shutdown:
        runner = PackRunner(folder, Path(args.output), max_slots=args.max_slots, idle_exit=args.idle_exit,
                            metrics_port=args.metrics_port, shutdown=shutdown, metrics_linger=args.metrics_linger)
        try:
            return runner.run()
        except TrainingInterrupted as stop:
            log.warning("%s", stop)
            return INTERRUPTED_EXIT_CODE
