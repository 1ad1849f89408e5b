"""The status fields a user reads in `kubectl get pj` (and in result.json, which equals them)."""

from __future__ import annotations

from typing import Optional

from personalize.progress import format_duration
from personalize.spec import Progress


def running_progress(step: int, max_steps: int, eta_seconds: Optional[float], elapsed_seconds: float,
                     stage: Optional[str] = None) -> Progress:
    """Where a run is: its step, share of the budget, time so far and ETA (also as H:MM:SS)."""
    return Progress(
        step=step,
        max_steps=max_steps,
        percent=round(100.0 * step / max_steps, 2),
        eta_seconds=eta_seconds,
        eta=format_duration(eta_seconds) if eta_seconds is not None else None,
        elapsed_seconds=round(elapsed_seconds, 3),
        elapsed=format_duration(elapsed_seconds),
        stage=stage,
    )


def ended_progress(progress: Optional[Progress], elapsed_seconds: float) -> Optional[Progress]:
    """A run's progress once it has ended, whichever way: where it stopped, its time, no ETA."""
    if progress is None:
        return None
    return progress.model_copy(update={"eta_seconds": None, "eta": None, "elapsed_seconds": round(elapsed_seconds, 3),
                                       "elapsed": format_duration(elapsed_seconds)})


def shown(value: Optional[float]) -> Optional[float]:
    """A value for a kubectl column: 4 significant digits (0.1492, not 0.14920122623443604)."""
    return float(f"{value:.4g}") if value is not None else None
