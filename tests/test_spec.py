"""The shared API model: defaults, per-method resolution, and errors that name the field."""

import json

import pytest

from personalize.criteria import stop_threshold, window_in_evaluations
from personalize.spec import (
    METHOD_DEFAULTS,
    Method,
    SpecError,
    load_job,
    parse_job,
)


def minimal(**overrides):
    spec = {
        "baseModel": {"builtin": "tiny-world"},
        "method": "textualInversion",
        "concept": {"images": {"path": "/data/cat"}, "classNoun": "cat"},
    }
    spec.update(overrides)
    return spec


@pytest.mark.parametrize("method", list(Method))
def test_per_method_defaults_are_resolved(method):
    spec = parse_job(minimal(method=method.value)).spec
    d = METHOD_DEFAULTS[method]
    assert spec.max_steps == d.max_steps
    assert spec.learning_rate == d.learning_rate
    assert spec.window == d.window
    assert stop_threshold(spec) == d.threshold
    assert spec.prior_preservation_enabled == d.prior_preservation


def test_published_dvar_settings():
    assert (METHOD_DEFAULTS[Method.textual_inversion].window, METHOD_DEFAULTS[Method.textual_inversion].threshold) == (310, 0.15)
    assert (METHOD_DEFAULTS[Method.dreambooth].window, METHOD_DEFAULTS[Method.dreambooth].threshold) == (440, 0.4)
    assert (METHOD_DEFAULTS[Method.custom_diffusion].window, METHOD_DEFAULTS[Method.custom_diffusion].threshold) == (180, 0.15)


def test_lora_borrows_textual_inversions_dvar_setting():
    """spec.py and docs/criteria.md say so: LoRA has no published setting of its own."""
    lora, ti = METHOD_DEFAULTS[Method.lora], METHOD_DEFAULTS[Method.textual_inversion]
    assert (lora.window, lora.threshold) == (ti.window, ti.threshold)


def test_explicit_values_override_defaults():
    spec = parse_job(
        minimal(training={"maxSteps": 50, "learningRate": 0.1}, earlyStopping={"window": 20, "threshold": 0.3})
    ).spec
    assert (spec.max_steps, spec.learning_rate, spec.window, stop_threshold(spec)) == (50, 0.1, 20, 0.3)


@pytest.mark.parametrize("eval_every,expected", [(1, 310), (5, 62), (7, 45), (1000, 2)])
def test_window_in_steps_becomes_window_in_evaluations(eval_every, expected):
    spec = parse_job(minimal(earlyStopping={"evalEvery": eval_every})).spec
    assert window_in_evaluations(spec.window, spec.early_stopping.eval_every) == expected


def test_full_manifest_and_bare_spec_agree(tmp_path):
    manifest = {
        "apiVersion": "personalization.dvar.dev/v1alpha1",
        "kind": "PersonalizationJob",
        "metadata": {"name": "cat", "namespace": "team-a"},
        "spec": minimal(),
    }
    (tmp_path / "job.json").write_text(json.dumps(manifest))
    (tmp_path / "spec.yaml").write_text("baseModel: {builtin: tiny-world}\nmethod: textualInversion\n"
                                        "concept: {images: {path: /data/cat}, classNoun: cat}\n")
    full = load_job(tmp_path / "job.json")
    bare = load_job(tmp_path / "spec.yaml")
    assert full.metadata.name == "cat"
    assert full.spec == bare.spec


@pytest.mark.parametrize(
    "patch,field",
    [
        ({"method": "hypernetwork"}, "spec.method"),
        ({"training": {"maxSteps": 0}}, "spec.training.maxSteps"),
        ({"training": {"learningRate": -1}}, "spec.training.learningRate"),
        ({"training": {"maxStep": 10}}, "spec.training.maxStep"),
        ({"earlyStopping": {"criterion": "patience"}}, "spec.earlyStopping.criterion"),
        ({"earlyStopping": {"evalEvery": 0}}, "spec.earlyStopping.evalEvery"),
        ({"earlyStopping": {"window": 1}}, "spec.earlyStopping.window"),
        ({"baseModel": {"path": "/m", "hubId": "x/y"}}, "spec.baseModel"),
        ({"concept": {"images": {"uri": "ftp://host/x"}, "classNoun": "cat"}}, "spec.concept.images"),
        ({"concept": {"images": {"path": "../../etc", "claimName": "pvc"}, "classNoun": "cat"}}, "spec.concept.images"),
        ({"concept": {"images": {"path": "/x"}, "classNoun": "cat", "token": "two words"}}, "spec.concept"),
        ({"resources": {"gpus": -1}}, "spec.resources.gpus"),
        ({"resources": {"memory": "lots"}}, "spec.resources.memory"),
        ({"output": {"path": "/abs", "claimName": "out"}}, "spec.output"),
        ({"output": {"path": "runs/../../other", "claimName": "out"}}, "spec.output"),
        ({"output": {"uri": "file:///var/data"}}, "spec.output"),
        ({"baseModel": {"path": "../models", "claimName": "models"}}, "spec.baseModel"),
        ({"concept": {"images": {"uri": "s3://key:secret@bucket/x"}, "classNoun": "cat"}}, "spec.concept.images"),
        ({"concept": {"images": {"uri": "https://h/x?X-Amz-Signature=s"}, "classNoun": "cat"}}, "spec.concept.images"),
        ({"output": {"secretRef": {"name": "s", "key": "k"}}}, "spec.output.secretRef.key"),
    ],
)
def test_bad_values_name_the_field(patch, field):
    with pytest.raises(SpecError) as err:
        parse_job(minimal(**patch))
    assert str(err.value).startswith(field), str(err.value)


def test_cross_field_rules():
    with pytest.raises(SpecError, match="priorPreservation"):
        parse_job(minimal(method="dreambooth", concept={"images": {"path": "/x"}, "captionTemplate": "a {token}"}))
    with pytest.raises(SpecError, match="minSteps"):
        parse_job(minimal(training={"maxSteps": 10, "minSteps": 20}))
    with pytest.raises(SpecError, match="priorPreservation.enabled"):
        parse_job(minimal(priorPreservation={"enabled": True}))
    # Dreambooth without a class noun is fine when prior preservation is switched off.
    parse_job(minimal(method="dreambooth", priorPreservation={"enabled": False},
                      concept={"images": {"path": "/x"}, "captionTemplate": "a {token}"}))


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_job(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("spec: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML") as err:
        load_job(tmp_path / "bad.yaml")
    assert "\n" not in str(err.value)
    (tmp_path / "other.yaml").write_text("kind: Deployment\nspec: {}\n")
    with pytest.raises(SpecError, match="kind"):
        load_job(tmp_path / "other.yaml")


def test_fixed_components_code():
    spec = parse_job(minimal(earlyStopping={"fixed": {"noise": False, "timesteps": False}})).spec
    assert spec.early_stopping.fixed.code() == "11010"
