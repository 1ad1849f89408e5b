"""One losses.csv row per training step.

Columns: step, train_loss, deterministic_loss, convergence_value; then L_det of each reference
slot, named by its timestep (`deterministic_loss[t=0999]`, flow matching:
`deterministic_loss[sigma=0.7312]`), filled at the steps that evaluated L_det; then the training
statistics of training_stats.py (lr, grad_norm, update_ratio, update_cosine, adam_snr). An empty
cell: not measured at that step (or undefined, like the first step's update cosine).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Optional

BASE_COLUMNS = ("step", "train_loss", "deterministic_loss", "convergence_value")
TIMESTEP_PREFIX = "deterministic_loss["


def timestep_column(label: str) -> str:
    """The losses.csv column of one reference slot: `deterministic_loss[t=0999]`."""
    return f"{TIMESTEP_PREFIX}{label}]"


def timestep_label(column: str) -> Optional[str]:
    """The slot label of a per-timestep column, None for any other column."""
    if column.startswith(TIMESTEP_PREFIX) and column.endswith("]"):
        return column[len(TIMESTEP_PREFIX):-1]
    return None


def _finite(value: Optional[float]) -> Optional[float]:
    return value if value is not None and math.isfinite(value) else None


def step_row(step: int, record: Any) -> dict[str, Any]:
    """The row of one `StepRecord` (`step` counted over the whole run)."""
    row: dict[str, Any] = {"step": step, "train_loss": record.train_loss,
                           "deterministic_loss": record.deterministic_loss,
                           "convergence_value": record.convergence_value}
    for label, value in (record.timestep_losses or {}).items():
        row[timestep_column(label)] = _finite(value)
    for name, value in (record.stats or {}).items():
        row[name] = _finite(value)
    return row


def columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """The header of `rows`: the base columns, the per-timestep ones in the order they first
    appear, then the statistics."""
    timesteps, stats = {}, {}
    for row in rows:
        for key in row:
            if key in BASE_COLUMNS:
                continue
            (timesteps if timestep_label(key) is not None else stats).setdefault(key, None)
    return [*BASE_COLUMNS, *timesteps, *stats]


def timestep_series(rows: Iterable[Mapping[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """Each slot's L_det as (steps, values), by slot label, from rows or losses.csv (strings)."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        for key, raw in row.items():
            label = timestep_label(key)
            if label is None or raw is None or raw == "":
                continue
            steps, values = series.setdefault(label, ([], []))
            steps.append(float(row["step"]))
            values.append(float(raw))
    return series
