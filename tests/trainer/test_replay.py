"""`personalize-train replay` stops where a brute-force reference over the recorded series says."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from personalize import cli
from personalize.replay import DEFAULT_SET

sys.path.insert(0, str(Path(__file__).parent))  # works under any pytest import mode
from criteria_reference import REFERENCES  # noqa: E402

DEFAULT_THRESHOLDS = {"dvar": 0.15, "ema": 0.01, "hall": 0.1, "trend": 1e-4}  # textualInversion defaults


def crafted_series(steps: int = 400, seed: int = 0) -> np.ndarray:
    """A deterministic loss: fast decay, plateau, small noise. Index i is the loss at step i+1."""
    rng = np.random.default_rng(seed)
    t = np.arange(1, steps + 1, dtype=float)
    return 0.12 + 0.4 * np.exp(-t / 40) + 2e-4 * rng.standard_normal(steps)


def reference_stop(
    steps: list[int], losses: list[float], name: str, window_steps: int, spacing: int,
    threshold: float, min_steps: int = 0, last_step: int | None = None,
) -> int | None:
    """Walk every training step; after each, recompute the criterion from all evaluations so far."""
    n = max(2, math.ceil(window_steps / spacing))
    ref = REFERENCES[name]
    last_step = steps[-1] if last_step is None else last_step
    for s in range(1, last_step + 1):
        history = np.array([v for st, v in zip(steps, losses) if st <= s and np.isfinite(v)])
        if len(history) == 0 or s < min_steps:
            continue
        value = ref(history, n, spacing) if name == "trend" else ref(history, n)
        if value is not None and abs(value) < threshold:
            return s
    return None


def write_losses_csv(path: Path, losses: np.ndarray, eval_every: int = 1) -> list[int]:
    """Like the training loop: a row per step, deterministic loss only at evaluated steps."""
    lines = ["step,train_loss,deterministic_loss,convergence_value"]
    evaluated = []
    for i, loss in enumerate(losses, start=1):
        if i % eval_every == 0:
            evaluated.append(i)
            lines.append(f"{i},{loss * 3:.9g},{float(loss)!r},")
        else:
            lines.append(f"{i},{loss * 3:.9g},,")
    path.write_text("\n".join(lines) + "\n")
    return evaluated


def replay(capsys, *argv: str) -> tuple[int, list[dict], str]:
    code = cli.main(["replay", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines() if line.strip()], err


@pytest.mark.parametrize("name", DEFAULT_SET)  # every replayable criterion that can stop
def test_replay_stops_where_reference_says(tmp_path, capsys, name):
    losses = crafted_series()
    path = tmp_path / "losses.csv"
    write_losses_csv(path, losses)
    threshold = {"dvar": 0.2, "ema": 0.02, "hall": 0.05, "trend": 5e-4}[name]
    code, [result], err = replay(capsys, "--criterion", name, "--window", 30, "--threshold", threshold, path)
    assert code == 0, err
    want = reference_stop(list(range(1, 401)), list(losses), name, 30, 1, threshold)
    assert want is not None and 30 <= want < 400  # the crafted series does converge mid-run
    assert result["stop_step"] == want
    assert result["criterion"] == name and result["window"] == 30 and result["window_evaluations"] == 30


@pytest.mark.parametrize("name", ["dvar", "hall", "trend"])
def test_replay_eval_every_subsamples_a_per_step_series(tmp_path, capsys, name):
    losses = crafted_series(seed=1)
    path = tmp_path / "losses.csv"
    write_losses_csv(path, losses)
    threshold = {"dvar": 0.2, "hall": 0.05, "trend": 5e-4}[name]
    code, [result], _ = replay(
        capsys, "--criterion", name, "--window", 42, "--threshold", threshold, "--eval-every", 5, path
    )
    assert code == 0
    steps = list(range(5, 401, 5))
    want = reference_stop(steps, [losses[s - 1] for s in steps], name, 42, 5, threshold, last_step=400)
    assert want is not None and want % 5 == 0
    assert result["stop_step"] == want
    assert result["window_evaluations"] == 9 and result["eval_every"] == 5 and result["evaluations"] == 80


def test_replay_infers_spacing_of_a_sparse_csv(tmp_path, capsys):
    losses = crafted_series(seed=2)
    path = tmp_path / "losses.csv"
    evaluated = write_losses_csv(path, losses, eval_every=4)
    code, [result], _ = replay(capsys, "--criterion", "dvar", "--window", 40, "--threshold", 0.2, path)
    assert code == 0
    assert result["eval_every"] == 4 and result["window_evaluations"] == 10
    want = reference_stop(evaluated, [losses[s - 1] for s in evaluated], "dvar", 40, 4, 0.2, last_step=400)
    assert result["stop_step"] == want is not None


def test_min_steps_delays_the_stop_to_min_steps(tmp_path, capsys):
    losses = crafted_series(seed=3)
    path = tmp_path / "losses.csv"
    write_losses_csv(path, losses)
    _, [free], _ = replay(capsys, "--criterion", "dvar", "--window", 30, "--threshold", 0.2, path)
    min_steps = free["stop_step"] + 37
    _, [held], _ = replay(
        capsys, "--criterion", "dvar", "--window", 30, "--threshold", 0.2, "--min-steps", min_steps, path
    )
    want = reference_stop(list(range(1, 401)), list(losses), "dvar", 30, 1, 0.2, min_steps=min_steps)
    assert held["stop_step"] == want
    assert held["stop_step"] >= min_steps


def test_never_converging_gives_null(tmp_path, capsys):
    path = tmp_path / "series.json"
    path.write_text(json.dumps([float(x) for x in np.linspace(1.0, 0.1, 200)]))  # a straight decline
    code, [result], _ = replay(capsys, "--criterion", "trend", "--window", 20, "--threshold", 1e-4, path)
    assert code == 0 and result["stop_step"] is None and result["value"] is not None


def test_json_formats_agree_with_csv(tmp_path, capsys):
    losses = crafted_series(seed=4)
    csv_path = tmp_path / "losses.csv"
    write_losses_csv(csv_path, losses)
    list_path = tmp_path / "list.json"
    list_path.write_text(json.dumps([float(x) for x in losses]))
    records_path = tmp_path / "records.json"
    records_path.write_text(
        json.dumps([{"step": i, "deterministic_loss": float(x)} for i, x in enumerate(losses, start=1)])
    )
    outputs = [replay(capsys, "--window", 30, p)[1] for p in (csv_path, list_path, records_path)]
    assert outputs[0] == outputs[1] == outputs[2]


def test_default_run_prints_one_line_per_criterion_with_defaults(tmp_path, capsys):
    losses = crafted_series(steps=900, seed=5)
    path = tmp_path / "losses.csv"
    write_losses_csv(path, losses)
    code, results, _ = replay(capsys, path)
    assert code == 0
    assert [r["criterion"] for r in results] == ["dvar", "ema", "hall", "trend"]
    for r in results:
        assert r["window"] == 310 and r["threshold"] == DEFAULT_THRESHOLDS[r["criterion"]]
    dvar = results[0]
    assert dvar["stop_step"] == reference_stop(list(range(1, 901)), list(losses), "dvar", 310, 1, 0.15)


def test_non_finite_values_are_skipped(tmp_path, capsys):
    losses = crafted_series(seed=6)
    losses[[20, 21, 35]] = np.nan  # before the stop (about step 55)
    path = tmp_path / "losses.csv"
    write_losses_csv(path, losses)
    code, [result], _ = replay(capsys, "--criterion", "dvar", "--window", 30, "--threshold", 0.2, path)
    assert code == 0 and result["ignored_nonfinite"] == 3
    assert result["stop_step"] == reference_stop(list(range(1, 401)), list(losses), "dvar", 30, 1, 0.2)


@pytest.mark.parametrize(
    "content, argv, message",
    [
        (None, [], "no such file"),
        ("step,loss\n1,0.5\n", [], "missing column(s) deterministic_loss"),
        ("step,train_loss,deterministic_loss,convergence_value\n1,0.3,abc,\n", [], "line 2 deterministic_loss: 'abc' is not a number"),
        ("step,train_loss,deterministic_loss,convergence_value\n2,0.3,0.1,\n1,0.3,0.1,\n", [], "steps must increase"),
        ("step,train_loss,deterministic_loss,convergence_value\n1,0.3,,\n", [], "no deterministic-loss values"),
        ("[1, 2, \"x\"]", [], "item 2: expected a number"),
        ("[1, 2", [], "not valid JSON"),
        ("[1, 2, 3]", ["--criterion", "dvarx"], "unknown criterion 'dvarx'"),
        ("[1, 2, 3]", ["--criterion", "clip"], "clip needs scores of samples"),
        ("[1, 2, 3]", ["--threshold", "-1"], "--threshold must be a positive number"),
        ("[1, 2, 3]", ["--window", "abc"], "invalid int value"),
        ("[1, 2, 3]", ["--eval-every", "0"], "--eval-every must be >= 1"),
    ],
)
def test_bad_input_gives_one_line_error_and_exit_2(tmp_path, capsys, content, argv, message):
    path = tmp_path / "input"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) if "invalid int" in message else _no_exit():
        code = cli.main(["replay", *argv, str(path)])
        assert code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("personalize-train replay: error:") and message in err


class _no_exit:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


DEMO_JOB = Path(__file__).resolve().parents[2] / "demo" / "job.yaml"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """demo/job.yaml (demo.sh's run) at a smaller scale: the same concept, model and criterion,
    a shorter window and budget, evaluation every 2 steps and a minSteps, so that each setting
    replay must take from result.json differs from replay's defaults."""
    import yaml

    from personalize.run import main
    from personalize.world.shapes import concept_by_name, write_concept_images

    folder = tmp_path_factory.mktemp("demo")
    manifest = yaml.safe_load(DEMO_JOB.read_text())
    spec = manifest["spec"]
    spec["concept"]["images"] = {"path": str(write_concept_images(
        concept_by_name("red_striped_triangle"), 8, folder / "concept-images", seed=0)[0].parent)}
    spec["training"].update(maxSteps=150, minSteps=12)
    spec["earlyStopping"].update(window=16, evalEvery=2)
    spec["validation"] = {"numImagesPerPrompt": 1, "inferenceSteps": 1}
    config = folder / "job.yaml"
    config.write_text(yaml.safe_dump(manifest))
    out = folder / "demo-output"
    assert main(["--config", str(config), "--output", str(out)]) == 0
    return out, json.loads((out / "result.json").read_text())


def test_a_runs_own_csv_replays_to_its_stop_step(demo_run, capsys):
    out, result = demo_run
    early_stop = result["earlyStop"]
    assert early_stop["reason"] == "ConvergenceThreshold"  # the run stopped early: there is a step to find
    code, [replayed], err = replay(capsys, out / "losses.csv")
    assert code == 0, err
    assert replayed["stop_step"] == early_stop["step"]
    assert replayed["defaults_from"] == str(out / "result.json")
    assert (replayed["criterion"], replayed["window"], replayed["threshold"], replayed["eval_every"],
            replayed["min_steps"]) == ("dvar", 16, 0.15, 2, 12)


def test_flags_override_the_runs_settings_and_no_result_ignores_them(demo_run, capsys):
    out, result = demo_run
    _, [wider], _ = replay(capsys, "--window", 400, out / "losses.csv")
    assert (wider["window"], wider["min_steps"], wider["defaults_from"]) == (400, 12, str(out / "result.json"))
    assert wider["stop_step"] is None  # 400 steps of window never fill in the run's series
    _, [held], _ = replay(capsys, "--min-steps", result["earlyStop"]["step"] + 5, out / "losses.csv")
    assert held["min_steps"] == result["earlyStop"]["step"] + 5 and held["window"] == 16
    assert held["stop_step"] is None or held["stop_step"] >= result["earlyStop"]["step"] + 5
    _, plain, _ = replay(capsys, "--no-result", out / "losses.csv")
    assert [r["criterion"] for r in plain] == list(DEFAULT_SET)
    assert all(r["window"] == 310 and r["min_steps"] == 0 and r["defaults_from"] is None for r in plain)
    assert plain[0]["stop_step"] is None  # the method's 310-step window is longer than the whole run


def test_an_unreadable_result_json_beside_the_csv_is_named(tmp_path, capsys):
    write_losses_csv(tmp_path / "losses.csv", crafted_series())
    (tmp_path / "result.json").write_text("{not json")
    code = cli.main(["replay", str(tmp_path / "losses.csv")])
    _, err = capsys.readouterr()
    assert code == 2 and "result.json" in err and "--no-result" in err


def test_an_older_result_json_gives_the_window_in_evaluations_times_eval_every(tmp_path, capsys):
    """Before earlyStop.windowSteps, result.json had the window in evaluations and reference.evalEvery."""
    losses = crafted_series(seed=7)
    evaluated = write_losses_csv(tmp_path / "losses.csv", losses, eval_every=4)
    (tmp_path / "result.json").write_text(json.dumps({
        "earlyStop": {"criterion": "dvar", "threshold": 0.2, "window": 10}, "reference": {"evalEvery": 4}}))
    code, [result], _ = replay(capsys, tmp_path / "losses.csv")
    assert code == 0
    assert (result["window"], result["window_evaluations"], result["threshold"], result["min_steps"]) == (40, 10, 0.2, 0)
    want = reference_stop(evaluated, [losses[s - 1] for s in evaluated], "dvar", 40, 4, 0.2, last_step=400)
    assert result["stop_step"] == want is not None
