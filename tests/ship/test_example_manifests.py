"""examples/: one PersonalizationJob manifest per method, each accepted by the shared spec model
(what the operator validates and the trainer reads) and by the CRD's schema (what the API server
checks on `kubectl apply`)."""

from __future__ import annotations

import jsonschema
import pytest
import yaml

from personalize.spec import Method, parse_job
from pj_operator import validation
from pj_operator.settings import Settings
from ship_helpers import CRD_FILE, EXAMPLES, example_chart_values, operator_env

FILES = sorted(EXAMPLES.glob("*.yaml"))


def _load(path):
    return yaml.safe_load(path.read_text())


def test_every_method_has_an_example():
    methods = {_load(p)["spec"]["method"] for p in FILES}
    assert methods == {m.value for m in Method}


def test_the_sdxl_and_flux_lora_examples_name_their_families():
    """The model families beyond SD 1.x/2.x have their own LoRA examples."""
    bases = {p.stem: _load(p)["spec"]["baseModel"]["path"] for p in FILES if p.stem.endswith("-lora")}
    assert "xl" in bases["sdxl-lora"].lower() and "flux" in bases["flux-lora"].lower()


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_example_parses_with_the_spec_model(path):
    manifest = _load(path)
    job = parse_job(manifest)
    assert job.metadata.name == manifest["metadata"]["name"]
    assert job.metadata.namespace
    assert job.spec.method.value == manifest["spec"]["method"]


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_example_is_accepted_by_the_crd_schema(path):
    crd = yaml.safe_load(CRD_FILE.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
    manifest = _load(path)
    assert manifest["apiVersion"] == f"{crd['spec']['group']}/{version['name']}"
    assert manifest["kind"] == crd["spec"]["names"]["kind"]
    # Kubernetes' structural schemas are OpenAPI 3.0: boolean exclusiveMinimum, as in draft 4.
    # (Unknown fields would be pruned, not rejected, by the API server: parse_job rejects those.)
    jsonschema.Draft4Validator(version["schema"]["openAPIV3Schema"]).validate(manifest)


def _first_line(path):
    return path.read_text().splitlines()[0]


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_example_passes_the_operators_checks_with_the_charts_defaults(path):
    """What the operator checks beyond the schema (Kubernetes names, method sections, Kueue, the
    admission policy), with the settings the chart's default values give it plus any chart value
    the example's first line names."""
    manifest = _load(path)
    manifest["metadata"]["uid"] = "0000-example"
    settings = Settings.from_env(operator_env(example_chart_values(_first_line(path)) or None))
    checked = validation.validate_job(manifest, settings)
    assert checked.problems == [], checked.problems


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_examples_first_line_names_the_namespace_volumes_and_secrets_it_needs(path):
    manifest = _load(path)
    line = _first_line(path)
    assert line.startswith(f"# Needs in namespace {manifest['metadata']['namespace']}: ")
    spec = manifest["spec"]
    sources = [spec["baseModel"], spec["concept"]["images"], spec.get("output", {})]
    for claim in {s["claimName"] for s in sources if s.get("claimName")}:
        assert f" {claim}" in line, claim
    for secret in {s["secretRef"]["name"] for s in sources if s.get("secretRef")}:
        assert f"Secret {secret}" in line, secret


def test_a_chart_value_named_on_the_first_line_is_read_as_a_values_dict():
    line = "# Needs in namespace team-a: PVC outputs; chart value operator.kueue.enabled=true, chart value x.y=3"
    assert example_chart_values(line) == {"operator": {"kueue": {"enabled": True}}, "x": {"y": 3}}
    assert example_chart_values("# Needs in namespace team-a: PVCs models, datasets and outputs.") == {}
