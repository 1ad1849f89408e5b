"""convergence.png: the losses and the criterion of one run, with the stop step marked.

    losses       training loss (noisy, log scale, left) and L_det on an axis of its own (right,
                 linear, scaled to its range: L_det moves little next to the training loss's noise)
    convergence  |convergence value| of the criterion (log scale) and its threshold, drawn on that
                 axis with a tick and a label of its own; training stops when the value drops below
    timesteps    L_det of each reference slot divided by its first value, by timestep (or
                 sigma): which timestep moves, and when (only with per-timestep columns)

Every panel marks the stop step. The legends sit outside the panels, so they cover no curve.
Criteria compare magnitudes, and EMA/Trend values can be negative, hence the absolute value.

Uses the Agg canvas directly (no pyplot): no display needed, no global figure state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from personalize.reporting.rows import timestep_series

MAX_TIMESTEP_LEGEND = 12  # beyond this many slots the legend names the first and the last only


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


def _legend_outside(ax, handles=None, labels=None) -> None:
    """The legend right of the panel, where no curve is."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.10, 1.0), fontsize="small", borderaxespad=0.0)


def _plain_log_ticks(ax) -> None:
    """Log-axis ticks at 1, 2 and 5 per decade, written as plain numbers (0.2, not 2x10^-1)."""
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _mark_stop(ax, stop_step: Optional[int], label: Optional[str]) -> None:
    if stop_step is not None:
        ax.axvline(stop_step, color="black", linestyle=":", linewidth=1.5, label=label)


def build_convergence_figure(
    rows: Iterable[Mapping[str, Any]],
    threshold: Optional[float],
    stop_step: Optional[int],
    title: Optional[str] = None,
) -> Figure:
    rows = list(rows)
    timesteps = {label: s for label, s in timestep_series(rows).items() if s[1] and s[1][0] > 0}
    panels = 3 if timesteps else 2
    fig = Figure(figsize=(11, 3.2 * panels), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(panels, 1, sharex=True)
    loss_ax, conv_ax = axes[0], axes[1]
    stop_label = f"stop at step {stop_step}" if stop_step is not None else None

    # ---- losses: the training loss, and L_det on an axis of its own -------------------------
    steps, train = _series(rows, "train_loss")
    loss_ax.plot(steps, train, color="tab:gray", alpha=0.5, linewidth=0.8, label="training loss")
    loss_ax.set_yscale("log")
    _plain_log_ticks(loss_ax)
    loss_ax.set_ylabel("training loss")
    det_ax = loss_ax.twinx()
    steps, det = _series(rows, "deterministic_loss")
    det_ax.plot(steps, det, color="tab:blue", linewidth=1.5, marker="." if len(det) < 50 else None,
                label="deterministic loss L_det")
    if det:  # its own range, with a margin: the change is what matters, not the distance from 0
        low, high = min(det), max(det)
        pad = (high - low) * 0.08 or abs(high) * 0.05 or 1.0
        det_ax.set_ylim(low - pad, high + pad)
    det_ax.set_ylabel("L_det", color="tab:blue")
    det_ax.tick_params(axis="y", colors="tab:blue")
    _mark_stop(loss_ax, stop_step, stop_label)
    handles = loss_ax.get_legend_handles_labels()[0] + det_ax.get_legend_handles_labels()[0]
    labels = loss_ax.get_legend_handles_labels()[1] + det_ax.get_legend_handles_labels()[1]
    _legend_outside(det_ax, handles, labels)

    # ---- convergence: the criterion's value and the threshold on the same axis --------------
    steps, conv = _series(rows, "convergence_value")
    conv_ax.plot(steps, conv, color="tab:orange", linewidth=1.2, label="|convergence value|")
    if threshold is not None and threshold > 0:
        conv_ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=1.0, label=f"threshold {threshold:g}")
        # a tick of its own, so that the line reads as its value and not as a neighbour's
        conv_ax.set_yscale("log")
        _plain_log_ticks(conv_ax)
        low, high = conv_ax.get_ylim()  # autoscaled to the data and the threshold line
        ticks = [t for t in conv_ax.get_yticks() if low <= t <= high]
        conv_ax.set_yticks(sorted({*ticks, threshold}))
        conv_ax.annotate(f"stop below {threshold:g}", xy=(1.0, threshold), xycoords=("axes fraction", "data"),
                         xytext=(4, 0), textcoords="offset points", va="center", color="tab:red", fontsize="small")
    elif conv:
        conv_ax.set_yscale("log")
        _plain_log_ticks(conv_ax)
    conv_ax.set_ylabel("convergence value")
    _mark_stop(conv_ax, stop_step, stop_label)
    _legend_outside(conv_ax)

    # ---- each timestep's L_det relative to its first value ----------------------------------
    if timesteps:
        ts_ax = axes[2]
        colors = colormaps["viridis"]
        named = list(timesteps)
        for i, label in enumerate(named):
            steps, values = timesteps[label]
            first_or_last = i in (0, len(named) - 1)
            ts_ax.plot(steps, [v / values[0] for v in values], color=colors(i / max(len(named) - 1, 1)), linewidth=1.0,
                       label=label if len(named) <= MAX_TIMESTEP_LEGEND or first_or_last else None)
        ts_ax.axhline(1.0, color="lightgray", linewidth=0.8)
        ts_ax.set_ylabel("L_det / first value")
        _mark_stop(ts_ax, stop_step, stop_label)
        _legend_outside(ts_ax)

    axes[-1].set_xlabel("step")
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
    convergence_value and optionally the per-timestep columns; missing cells as None, '' or NaN)
    to `path` (PNG)."""
    path = Path(path)
    fig = build_convergence_figure(rows, threshold, stop_step, title=title)
    fig.savefig(path, format="png")
    return path
