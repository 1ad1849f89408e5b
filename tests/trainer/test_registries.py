"""The registries of criteria and methods match the spec's enums, and what each registered
criterion declares is what the training loop and replay use."""

from __future__ import annotations

import math
import subprocess
import sys
from argparse import Namespace

import pytest

from personalize.criteria import CRITERIA, StopPolicy, build_criterion, default_threshold, from_spec, make_criterion
from personalize.replay import REPLAYABLE, run as replay_run
from personalize.spec import CriterionName, EarlyStopping, Method, parse_spec


def test_every_spec_criterion_has_one_registered_class():
    assert sorted(CRITERIA) == sorted(c.value for c in CriterionName)
    assert all(cls.name == name for name, cls in CRITERIA.items())


def test_every_spec_method_has_one_registered_class():
    from personalize.methods import METHODS

    assert sorted(METHODS) == sorted(m.value for m in Method)
    assert all(cls.name == name for name, cls in METHODS.items())


def test_the_spec_and_the_criteria_import_without_torch():
    code = "import sys, personalize.spec, personalize.criteria, personalize.replay; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_a_criterion_takes_the_options_it_declares_and_no_others(name):
    cls = CRITERIA[name]
    options = cls.spec_options(EarlyStopping(), 5)
    assert set(options) <= set(cls.options)
    criterion = make_criterion(name, 4, default_threshold(name, 0.2), **options)
    assert type(criterion) is cls
    with pytest.raises(ValueError, match="does not take option"):
        make_criterion(name, 4, 0.2, not_an_option=1)


@pytest.mark.parametrize("name", sorted(CRITERIA))
def test_the_loop_builds_the_criterion_the_spec_names(name):
    spec = parse_spec({
        "baseModel": {"builtin": "tiny-world"}, "method": "lora", "concept": {"images": {"path": "x"}, "classNoun": "dog"},
        "earlyStopping": {"criterion": name, "evalEvery": 5, "clip": {"modelPath": "clip", "patience": 7}},
    })
    criterion = from_spec(spec, window_steps=31, threshold=0.25)
    assert criterion.name == name
    if name == "clip":
        assert (criterion.window, criterion.threshold) == (7, 0.0)  # patience and epsilon
    else:
        assert (criterion.window, criterion.threshold) == (7, 0.25)  # ceil(31 / 5) evaluations
    if name == "trend":
        assert criterion.eval_every == 5


@pytest.mark.parametrize("name", REPLAYABLE)
def test_replay_stops_where_the_loop_would(name, tmp_path):
    """The loop checks after every step; L_det every 3 steps. Replay must name the same step."""
    values = [0.2 + math.exp(-i / 10) + 1e-6 * ((-1) ** i) for i in range(1, 200)]  # decays to a plateau
    eval_every, window_steps, threshold = 3, 12, default_threshold(name, 0.2)
    lines = ["step,train_loss,deterministic_loss,convergence_value"]
    policy = StopPolicy(build_criterion(name, window_steps, eval_every, threshold), max_steps=10_000, min_steps=10)
    loop_stop = None
    for step, value in enumerate(values, start=1):
        evaluated = step % eval_every == 0
        lines.append(f"{step},0.5,{value!r}," if evaluated else f"{step},0.5,,")
        if loop_stop is None and policy.observe(step, value if evaluated else None) is not None:
            loop_stop = step
    (tmp_path / "losses.csv").write_text("\n".join(lines) + "\n")
    args = Namespace(file=str(tmp_path / "losses.csv"), criterion=name, window=window_steps, threshold=threshold,
                     eval_every=None, min_steps=10, method="lora")
    (result,) = replay_run(args)
    assert result["stop_step"] == loop_stop
    assert result["criterion"] == name and result["eval_every"] == eval_every
    if CRITERIA[name].stops_early:
        assert loop_stop is not None  # the series converges: the comparison is not vacuous
