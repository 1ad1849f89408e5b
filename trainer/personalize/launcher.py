"""`personalize-train --num-processes N`: run the same command as N data-parallel processes.

The parent checks the input (preflight), then starts N copies of itself on this machine with the
torch.distributed environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) that torchrun
would set; accelerate reads it and joins them (NCCL on GPUs, gloo on CPU). Unlike torchrun, the
parent keeps the trainer's exit-code contract for the pod: it forwards SIGTERM/SIGINT to every
process (each saves its part of the checkpoint and exits 143), and when one process fails it
stops the others instead of leaving them blocked in a collective.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Optional, Sequence

WORKER_ENV = "PJ_WORKER"  # set in the processes the launcher starts (they must not launch again)
STOP_GRACE_SECONDS = 60.0  # a failed peer: how long the others get to exit on SIGTERM


def is_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def combined_exit_code(codes: list[int]) -> int:
    """One exit code for the pod: bad input (2) > interrupted (143) > failed (1) > done (0)."""
    for code in (2, 143):
        if code in codes:
            return code
    return 0 if all(c == 0 for c in codes) else 1


def launch(argv: list[str], num_processes: int, command: Optional[Sequence[str]] = None) -> int:
    """Run `personalize-train argv` (without --num-processes) as `num_processes` processes.

    `command` replaces `python -m personalize.cli` (a test runs a wrapper of the trainer)."""
    command = list(command or [sys.executable, "-m", "personalize.cli"])
    port = str(_free_port())
    procs = []
    for rank in range(num_processes):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(num_processes),
                   LOCAL_WORLD_SIZE=str(num_processes), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   **{WORKER_ENV: "1"})
        procs.append(subprocess.Popen([*command, *argv], env=env))

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        failed_at = None
        while any(p.poll() is None for p in procs):
            codes = [p.poll() for p in procs]
            if failed_at is None and any(c not in (None, 0) for c in codes):
                failed_at = time.monotonic()  # a peer ended badly: the others cannot finish
                forward(signal.SIGTERM, None)
            if failed_at is not None and time.monotonic() - failed_at > STOP_GRACE_SECONDS:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.2)
        return combined_exit_code([_exit_code(p.returncode) for p in procs])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _exit_code(returncode: int) -> int:
    """A process killed by signal S reports -S; a shell would say 128 + S."""
    return 128 - returncode if returncode < 0 else returncode
