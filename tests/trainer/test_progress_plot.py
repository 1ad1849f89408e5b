"""The terminal progress line and the convergence plot."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from personalize.plotting import build_convergence_figure, plot_convergence
from personalize.progress import ProgressPrinter, format_duration, tracking_cost


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_log_mode_prints_a_line_with_eta_when_one_is_due():
    out, clock = io.StringIO(), Clock()
    p = ProgressPrinter(max_steps=1000, threshold=0.15, criterion="dvar", stream=out, is_tty=False, clock=clock,
                        every_steps=1)
    p.update(1, train_loss=0.5)
    clock.now = 10.0  # 10 s for 10 steps -> 1 s per step
    line = p.update(11, train_loss=0.4, deterministic_loss=0.25, convergence_value=0.3)
    p.close("stopped")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in out.getvalue()
    assert lines[1] == line
    assert "step   11/1000" in line and "1.1%" in line
    assert "loss 0.4" in line and "det 0.25" in line and "dvar 0.3 (stop < 0.15)" in line
    assert "ETA 0:16:29" in line  # 989 remaining steps at 1 s each
    assert "det -" in lines[0] and "ETA ?" in lines[0]  # nothing known yet
    assert lines[2] == "stopped"


def test_log_mode_prints_every_n_steps_or_every_s_seconds_whichever_comes_first_and_the_last_step():
    out, clock = io.StringIO(), Clock()
    p = ProgressPrinter(max_steps=1000, stream=out, is_tty=False, clock=clock, every_steps=100, every_seconds=30)
    for step in range(1, 251):  # 0.1 s per step: 100 steps come before 30 s
        clock.now = 0.1 * step
        p.update(step, train_loss=0.5)
    for step in range(251, 261):  # then 11 s per step: 30 s come before 100 steps
        clock.now += 11.0
        p.update(step, train_loss=0.5)
    p.close("stopped at step 260/1000")
    printed = [int(line.split("/")[0].split()[-1]) for line in out.getvalue().splitlines()[:-1]]
    assert printed == [1, 101, 201, 253, 256, 259, 260]  # 260: the last step, printed at the close
    last = out.getvalue().splitlines()[-2]
    assert last.endswith("| done") and "ETA" not in last  # a run that stopped early leaves no ETA behind
    assert out.getvalue().splitlines()[-1] == "stopped at step 260/1000"


def test_a_terminal_gets_a_live_tqdm_bar_with_the_numbers_and_no_log_lines():
    out = io.StringIO()
    p = ProgressPrinter(max_steps=50, threshold=0.15, criterion="dvar", stream=out, is_tty=True, clock=Clock())
    for step in range(1, 21):
        p.update(step, train_loss=0.123, deterministic_loss=0.05, convergence_value=0.3)
    p.close("stopped")
    text = out.getvalue()
    assert "\r" in text and "20/50" in text  # redrawn in place, tqdm's counter
    assert "dvar 0.3 (stop < 0.15)" in text and "step 20/50" not in text  # the numbers, not the log line
    assert text.endswith("stopped\n")


def test_the_tracking_cost_note():
    assert tracking_cost(1.6, 5.9) == "evaluating the stop signal took 1.6 s of 5.9 s (27%)"
    assert tracking_cost(0.0, 0.0).endswith("(0%)")  # a stage that ran no step


def test_format_duration():
    assert format_duration(3725) == "1:02:05"
    assert format_duration(None) == "?" and format_duration(math.inf) == "?"


def rows_like_losses_csv(steps: int = 200, eval_every: int = 5) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for s in range(1, steps + 1):
        det = 0.1 + 0.3 * math.exp(-s / 30)
        row = {"step": s, "train_loss": det * (1 + 0.5 * abs(rng.standard_normal())), "deterministic_loss": "", "convergence_value": ""}
        if s % eval_every == 0:
            row["deterministic_loss"] = det
            row["convergence_value"] = 2.0 * math.exp(-s / 40) if s >= 50 else ""
        rows.append(row)
    rows[7]["train_loss"] = float("nan")  # a diverged step must not break the plot
    return rows


def with_timesteps(rows: list[dict]) -> list[dict]:
    """Per-timestep columns as losses.csv has them: the high-noise slot moves least."""
    for row in rows:
        if row["deterministic_loss"] != "":
            for label, k in (("t=0017", 0.6), ("t=0911", 0.05)):
                row[f"deterministic_loss[{label}]"] = 2 * row["deterministic_loss"] * (1 + k * math.exp(-row["step"] / 20))
    return rows


def axis(fig, ylabel: str):
    [found] = [ax for ax in fig.axes if ax.get_ylabel() == ylabel]
    return found


def test_l_det_has_an_axis_of_its_own_scaled_to_its_range():
    fig = build_convergence_figure(rows_like_losses_csv(), threshold=0.15, stop_step=120)
    loss_ax, det_ax = axis(fig, "training loss"), axis(fig, "L_det")
    assert loss_ax.get_yscale() == "log" and det_ax.get_yscale() == "linear"
    [det] = [line for line in det_ax.lines if line.get_label() == "deterministic loss L_det"]
    assert len(det.get_xdata()) == 40  # only evaluated steps
    low, high = min(det.get_ydata()), max(det.get_ydata())
    bottom, top = det_ax.get_ylim()
    assert bottom < low and high < top and (high - low) / (top - bottom) > 0.8  # the curve fills its axis
    [train] = [line for line in loss_ax.lines if line.get_label() == "training loss"]
    assert len(train.get_xdata()) == 199  # the NaN step left out


def test_the_threshold_is_on_the_convergence_axis_with_a_tick_and_a_label_of_its_own():
    fig = build_convergence_figure(rows_like_losses_csv(), threshold=0.15, stop_step=120)
    conv_ax = axis(fig, "convergence value")
    assert conv_ax.get_yscale() == "log"
    assert [line.get_ydata()[0] for line in conv_ax.lines if line.get_label() == "threshold 0.15"] == [0.15]
    assert 0.15 in list(conv_ax.get_yticks())
    fig.canvas.draw()
    assert "0.15" in [t.get_text() for t in conv_ax.get_yticklabels()]
    assert [t.get_text() for t in conv_ax.texts] == ["stop below 0.15"]


def test_every_panel_marks_the_stop_and_no_legend_covers_a_panel():
    fig = build_convergence_figure(with_timesteps(rows_like_losses_csv()), threshold=0.15, stop_step=120)
    panels = [axis(fig, "training loss"), axis(fig, "convergence value"), axis(fig, "L_det / first value")]
    for ax in panels:
        [stop] = [line for line in ax.lines if line.get_label() == "stop at step 120"]
        assert list(stop.get_xdata()) == [120, 120]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 3
    for legend in legends:
        box = legend.get_window_extent(renderer)
        assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in panels)


def test_the_timestep_panel_draws_each_slot_relative_to_its_first_value():
    fig = build_convergence_figure(with_timesteps(rows_like_losses_csv()), threshold=0.15, stop_step=None)
    ts_ax = axis(fig, "L_det / first value")
    curves = {line.get_label(): line.get_ydata() for line in ts_ax.lines if line.get_label().startswith("t=")}
    assert set(curves) == {"t=0017", "t=0911"}
    assert all(values[0] == pytest.approx(1.0) for values in curves.values())
    assert curves["t=0017"][-1] < curves["t=0911"][-1]  # the slot that moved most shows it
    # without per-timestep columns there is no such panel
    assert len(build_convergence_figure(rows_like_losses_csv(), 0.15, None).axes) == 3  # two panels + the L_det twin


def test_plot_convergence_writes_a_png(tmp_path):
    path = plot_convergence(with_timesteps(rows_like_losses_csv()), 0.15, None, tmp_path / "convergence.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[1] > img.size[0] * 0.8  # three panels stacked
    # A run that never evaluated still gets a plot.
    plot_convergence([{"step": 1, "train_loss": 0.5}], None, None, tmp_path / "empty.png")
    assert (tmp_path / "empty.png").stat().st_size > 0
