"""One process of a data-parallel `personalize-train` run that also writes, after each stage, a
digest of every parameter it trained: tests/trainer/test_loss_average.py launches two of these
and checks that the processes end with the same weights (gradients averaged everywhere).

    python replica_weights_worker.py DIGESTS_DIR --config JOB --output DIR
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import personalize.job_runner as job_runner
from personalize.run import main


def record_trained_weights(folder: Path) -> None:
    rank = os.environ["RANK"]
    original = job_runner.train_stage
    digests: list[list[str]] = []

    def train_stage(*args, **kwargs):
        outcome, method = original(*args, **kwargs)
        digests.append([hashlib.sha256(p.detach().float().cpu().numpy().tobytes()).hexdigest()
                        for p in method.parameters])
        (folder / f"rank{rank}.json").write_text(json.dumps(digests))
        return outcome, method

    job_runner.train_stage = train_stage


if __name__ == "__main__":
    record_trained_weights(Path(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
