"""The trainer's last words: a compact TrainerReport in the container's termination message.

Kubernetes copies the file at the container's `terminationMessagePath` (the operator sets
/dev/termination-log) into the pod status, at most 4096 bytes. If the trainer's final status
patch never arrived, the operator reads the decision from there
(`pj_operator.lifecycle.termination_report`, which validates it as a `TrainerReport`).

The path is `$PJ_TERMINATION_LOG` when set, else /dev/termination-log but only when that file
already exists (the kubelet creates it in the container; on a laptop nothing is written). A
failure to write is logged and never ends the run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

from personalize.spec import TrainerReport

log = logging.getLogger("personalize")

ENV_VAR = "PJ_TERMINATION_LOG"
DEFAULT_PATH = Path("/dev/termination-log")
MAX_BYTES = 4096  # the kubelet truncates longer messages
# What the operator needs to decide, most important first; the rest goes when space runs out.
ESSENTIAL_FIELDS = ("earlyStop", "progress", "identifier", "artifact", "message")


def _encode(data: dict[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


def compact_report(report: TrainerReport, max_bytes: int = MAX_BYTES) -> bytes:
    """The report as compact JSON of at most `max_bytes`, dropping fields until it fits."""
    full = report.to_api()
    candidates = [
        full,
        {k: full[k] for k in ESSENTIAL_FIELDS if k in full},
        {k: full[k] for k in ESSENTIAL_FIELDS if k in full and k != "message"},
    ]
    if "artifact" in full:  # a pipeline/ artifact can list many files: keep only where it is
        slim = {k: full[k] for k in ESSENTIAL_FIELDS if k in full and k != "message"}
        slim["artifact"] = {"location": full["artifact"]["location"]}
        candidates.append(slim)
    candidates.append({k: full[k] for k in ("earlyStop", "identifier") if k in full})
    for data in candidates:
        encoded = _encode(data)
        if len(encoded) <= max_bytes:
            return encoded
    return b"{}"


def termination_log_path() -> Optional[Path]:
    configured = os.environ.get(ENV_VAR)
    if configured:
        return Path(configured)
    return DEFAULT_PATH if DEFAULT_PATH.is_file() else None


def write_termination_message(report: TrainerReport) -> Optional[Path]:
    """Write the compact report to the termination log; returns the path, or None when skipped."""
    path = termination_log_path()
    if path is None:
        return None
    try:
        path.write_bytes(compact_report(report))
    except OSError as err:
        log.warning("could not write the termination message to %s: %s", path, err)
        return None
    return path
