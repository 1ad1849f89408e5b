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
from ship_helpers import CRD_FILE, EXAMPLES

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


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_example_passes_the_operators_checks(path):
    """What the operator checks beyond the schema (Kubernetes names, method sections, Kueue)."""
    manifest = _load(path)
    manifest["metadata"]["uid"] = "0000-example"
    checked = validation.validate_job(manifest, Settings(kueue_enabled=True))
    assert checked.problems == [], checked.problems
