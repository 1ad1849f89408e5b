"""convergence.png: the losses and the criterion of one run, with the stop step marked.

Left axis (log scale): training loss (noisy) and deterministic loss (smooth) per step.
Right axis (log scale): |convergence value| of the criterion and its threshold; training stops
when the value drops below the threshold. Criteria compare magnitudes, and EMA/Trend values
can be negative, hence the absolute value.

Uses the Agg canvas directly (no pyplot): no display needed, no global figure state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _value(row: Mapping[str, Any], key: str) -> Optional[float]:
    """A cell of a losses.csv-like row: None, '' and non-numbers mean "not measured"."""
    raw = row.get(key)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _series(rows: list[Mapping[str, Any]], key: str, positive: bool = True) -> tuple[list[float], list[float]]:
    steps, values = [], []
    for row in rows:
        step, value = _value(row, "step"), _value(row, key)
        if step is None or value is None:
            continue
        if positive:
            value = abs(value) if key == "convergence_value" else value
            if value <= 0:  # cannot be drawn on a log axis
                continue
        steps.append(step)
        values.append(value)
    return steps, values


def build_convergence_figure(
    rows: Iterable[Mapping[str, Any]],
    threshold: Optional[float],
    stop_step: Optional[int],
    title: Optional[str] = None,
) -> Figure:
    rows = list(rows)
    fig = Figure(figsize=(9, 5), dpi=100)
    FigureCanvasAgg(fig)
    loss_ax = fig.add_subplot(1, 1, 1)
    conv_ax = loss_ax.twinx()

    steps, train = _series(rows, "train_loss")
    loss_ax.plot(steps, train, color="tab:gray", alpha=0.5, linewidth=0.8, label="training loss")
    steps, det = _series(rows, "deterministic_loss")
    loss_ax.plot(steps, det, color="tab:blue", linewidth=1.5, marker="." if len(det) < 50 else None, label="deterministic loss")
    loss_ax.set_yscale("log")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")

    steps, conv = _series(rows, "convergence_value")
    conv_ax.plot(steps, conv, color="tab:orange", linewidth=1.2, label="|convergence value|")
    if threshold is not None and threshold > 0:
        conv_ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=1.0, label=f"threshold {threshold:g}")
    if conv or (threshold is not None and threshold > 0):
        conv_ax.set_yscale("log")
    conv_ax.set_ylabel("convergence value")

    if stop_step is not None:
        loss_ax.axvline(stop_step, color="black", linestyle=":", linewidth=1.5, label=f"stop at step {stop_step}")

    handles = loss_ax.get_legend_handles_labels()[0] + conv_ax.get_legend_handles_labels()[0]
    labels = loss_ax.get_legend_handles_labels()[1] + conv_ax.get_legend_handles_labels()[1]
    if handles:
        loss_ax.legend(handles, labels, loc="upper right", fontsize="small")
    if title:
        loss_ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_convergence(
    rows: Iterable[Mapping[str, Any]],
    threshold: Optional[float],
    stop_step: Optional[int],
    path: str | Path,
    title: Optional[str] = None,
) -> Path:
    """Write the convergence plot of `rows` (dicts with step, train_loss, deterministic_loss,
    convergence_value; missing cells as None, '' or NaN) to `path` (PNG)."""
    path = Path(path)
    fig = build_convergence_figure(rows, threshold, stop_step, title=title)
    fig.savefig(path, format="png")
    return path
