"""The files a finished (or interrupted) run leaves in its output folder besides the artifacts:
`losses.csv` (one row per step) and `result.json` (the trainer's status fields)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from personalize.reporting.rows import BASE_COLUMNS, columns

RESULT_FILE = "result.json"
LOSSES_FILE = "losses.csv"
PLOT_FILE = "convergence.png"
LOSSES_HEADER = BASE_COLUMNS


def write_losses_csv(rows: list[dict], path: Path) -> None:
    """One row per training step; an empty cell where the value was not computed at that step.
    The columns: LOSSES_HEADER, then what the rows add (reporting/rows.py: L_det per timestep,
    the training statistics)."""
    header = columns(rows)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow(["" if row.get(k) is None else row[k] for k in header])


def write_json(data: dict, path: Path) -> None:
    """Write via a temporary file and a rename: a reader never sees half a result.json."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
