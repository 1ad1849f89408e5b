"""A miniature training run that uses the preemption building blocks the way the real loop does.

Used by tests/trainer/test_checkpoint.py in child processes forked from the test (so that a
real SIGTERM or SIGKILL can hit them, without paying for a new interpreter and torch import),
and in-process through `train()` for the uninterrupted reference run. It also runs as a
script: `python checkpoint_worker.py --checkpoint-dir D --result R.json [--pause-at S]`.

The model is a small MLP with dropout fitted with Adam (and an exponential LR decay) on
random regression data. Every random stream the checkpoint must carry is used at every step:
  - the named `data` torch.Generator picks the mini-batch,
  - torch's global RNG drives dropout,
  - numpy's global RNG adds label noise,
  - python's `random` scales the loss.
A fixed reference batch gives the deterministic loss after every step, fed to DVAR through a
StopPolicy. Forgetting to save or restore any one of these makes the resumed series differ.

`--pause-at S` makes step S wait, between backward() and optimizer.step(), until a signal
arrives (the test sends it once the worker announces `PAUSED S`): a deterministic stand-in for a
SIGTERM landing in the middle of a step.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from personalize.checkpoint import TrainingCheckpoint, load_latest_checkpoint, save_checkpoint
from personalize.fingerprint import fingerprinted_spec, spec_fingerprint
from personalize.rng_state import capture_rng, restore_rng
from personalize.criteria import DvarCriterion, StopPolicy
from personalize.shutdown import GracefulShutdown

SPEC = {"method": "toy", "training": {"seed": 7, "learningRate": 0.001, "maxSteps": 400}, "window": 40}
WINDOW = 40
THRESHOLD = 0.02
N_EXAMPLES, N_FEATURES, BATCH, REFERENCE_SIZE = 256, 8, 16, 32


def build(seed: int):
    """Everything the spec determines: data, reference batch, model, optimizer, scheduler."""
    setup = torch.Generator().manual_seed(seed)
    x = torch.randn(N_EXAMPLES, N_FEATURES, generator=setup)
    w = torch.randn(N_FEATURES, 1, generator=setup)
    y = torch.tanh(x @ w) + 0.05 * torch.randn(N_EXAMPLES, 1, generator=setup)
    reference_gen = torch.Generator().manual_seed(seed + 1)
    reference_indices = torch.randperm(N_EXAMPLES, generator=reference_gen)[:REFERENCE_SIZE].tolist()

    torch.manual_seed(seed)  # model init (overwritten on resume by the checkpoint's tensors)
    model = torch.nn.Sequential(
        torch.nn.Linear(N_FEATURES, 16), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=SPEC["training"]["learningRate"])
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.995)
    policy = StopPolicy(DvarCriterion(WINDOW, THRESHOLD), max_steps=SPEC["training"]["maxSteps"], min_steps=10)
    return x, y, reference_indices, model, optimizer, scheduler, policy


def announce(message: str) -> None:
    print(message, flush=True)


def train(checkpoint_dir: Optional[Path], checkpoint_every: int = 0, pause_at: int = -1, tell=announce) -> dict:
    """Train until the criterion stops (or a signal asks to), resuming from `checkpoint_dir`.
    `tell` receives `PAUSED <step>` when the run waits for its signal."""
    seed = SPEC["training"]["seed"]
    fingerprint = spec_fingerprint(SPEC)
    x, y, reference_indices, model, optimizer, scheduler, policy = build(seed)
    data_gen = torch.Generator().manual_seed(seed + 2)
    random.seed(seed + 3)
    np.random.seed(seed + 4)

    rows: list[dict] = []
    start = 1
    resumed_from = None
    ckpt = load_latest_checkpoint(checkpoint_dir, fingerprint, fingerprinted_spec(SPEC)) if checkpoint_dir else None
    if ckpt is not None:
        if ckpt.reference["indices"] != reference_indices:
            raise RuntimeError("reference batch differs from the checkpoint's")
        model.load_state_dict(ckpt.trainable)
        optimizer.load_state_dict(ckpt.optimizer)
        scheduler.load_state_dict(ckpt.extra["lr_scheduler"])
        policy.load_state_dict(ckpt.criteria["policy"])
        restore_rng(ckpt.rng, {"data": data_gen})
        rows = list(ckpt.loss_rows)
        start = ckpt.step + 1
        resumed_from = ckpt.step

    def checkpoint(step: int) -> None:
        save_checkpoint(
            checkpoint_dir,
            TrainingCheckpoint(
                step=step,
                spec_fingerprint=fingerprint,
                spec=fingerprinted_spec(SPEC),
                trainable=model.state_dict(),
                optimizer=optimizer.state_dict(),
                rng=[capture_rng({"data": data_gen})],
                criteria={"policy": policy.state_dict()},
                reference={"indices": reference_indices},
                loss_rows=rows,
                identifier_tokens=["<toy>"],
                extra={"lr_scheduler": scheduler.state_dict()},
            ),
        )

    reason = None
    interrupted_at = None
    with GracefulShutdown() as shutdown:
        for step in range(start, policy.max_steps + 1):
            model.train()
            idx = torch.randint(N_EXAMPLES, (BATCH,), generator=data_gen)
            label_noise = torch.from_numpy(np.random.normal(0.0, 0.02, size=(BATCH, 1))).float()
            weight = random.uniform(0.9, 1.1)
            loss = weight * torch.nn.functional.mse_loss(model(x[idx]), y[idx] + label_noise)
            optimizer.zero_grad()
            loss.backward()
            if step == pause_at:
                tell(f"PAUSED {step}")
                deadline = time.monotonic() + 60
                while not shutdown.requested and time.monotonic() < deadline:
                    time.sleep(0.01)
            optimizer.step()
            scheduler.step()

            model.eval()
            with torch.no_grad():
                det = float(torch.nn.functional.mse_loss(model(x[reference_indices]), y[reference_indices]))
            reason = policy.observe(step, det)
            rows.append(
                {
                    "step": step,
                    "train_loss": float(loss.detach()),
                    "deterministic_loss": det,
                    "convergence_value": policy.criterion.value,
                }
            )
            if reason is not None:
                break
            if checkpoint_dir and checkpoint_every and step % checkpoint_every == 0:
                checkpoint(step)
            if shutdown.requested:
                checkpoint(step)
                interrupted_at = step
                break
    return {
        "rows": rows,
        "stop_step": rows[-1]["step"] if reason is not None else None,
        "reason": reason.value if reason is not None else None,
        "resumed_from": resumed_from,
        "interrupted_at": interrupted_at,
        "signal": shutdown.signal_name,
    }


def run_forked(conn, checkpoint_dir: Path, result: Path, checkpoint_every: int, pause_at: int) -> None:
    """Entry point of a child forked by the test (no second interpreter start-up to pay)."""
    torch.set_num_threads(1)
    outcome = train(checkpoint_dir, checkpoint_every, pause_at, tell=conn.send)
    result.write_text(json.dumps(outcome))
    conn.send("DONE")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint-dir", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--pause-at", type=int, default=-1)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = train(args.checkpoint_dir, args.checkpoint_every, args.pause_at)
    args.result.write_text(json.dumps(result))
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
