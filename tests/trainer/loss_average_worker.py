"""One process of a data-parallel `personalize-train` run that also records its own (local)
training loss at every step: tests/trainer/test_loss_average.py launches two of these through the
trainer's launcher and compares the loss the run reports with the mean of the local ones.

    python loss_average_worker.py LOCAL_LOSSES_DIR --config JOB --output DIR

The local loss is what the loop computes on this process's batch before any reduction: the mean
of `diffusion_loss(..., reduction="none")` (no prior preservation, one micro-batch per step).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

import personalize.loop as loop
from personalize.run import main


def record_local_losses(folder: Path) -> None:
    rank = os.environ["RANK"]
    losses: list[float] = []
    original = loop.diffusion_loss

    def diffusion_loss(*args, **kwargs):
        per_example = original(*args, **kwargs)
        if torch.is_inference_mode_enabled():  # L_det: the loop evaluates it with the same loss
            return per_example
        losses.append(float(per_example.detach().mean()))
        (folder / f"rank{rank}.json").write_text(json.dumps(losses))
        return per_example

    loop.diffusion_loss = diffusion_loss  # the training step's loss only


if __name__ == "__main__":
    record_local_losses(Path(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
