"""The generated CRD: in sync with the model, a valid apiextensions/v1 object, structural."""

from __future__ import annotations

import copy

import jsonschema
import kubernetes_validate
import pytest
import yaml

from fake_apiserver import crd_validator, openapi_to_jsonschema
from fake_cluster import pj_manifest
from pj_operator import crdgen
from personalize import spec as api


def test_crd_file_matches_the_model():
    assert crdgen.CRD_PATH.read_text() == crdgen.render(), "run: python -m pj_operator.crdgen"
    assert crdgen.main(["--check"]) == 0


def test_crd_is_a_valid_customresourcedefinition():
    crd = yaml.safe_load(crdgen.render())
    kubernetes_validate.validate(crd, "1.32.0", strict=True)


def _walk(node, path="openAPIV3Schema"):
    yield path, node
    for name, sub in (node.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        yield from _walk(node["items"], f"{path}[]")


def test_schema_is_structural():
    schema = crdgen.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "type" in node, path
        assert not {"$ref", "$defs", "anyOf", "oneOf", "allOf", "const", "title"} & set(node), path
        assert node.get("additionalProperties") is not False, path
        assert not ("properties" in node and isinstance(node.get("additionalProperties"), dict)), path
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path
        if "default" in node:
            assert not path.startswith("openAPIV3Schema.status"), path
            jsonschema.validate(node["default"], openapi_to_jsonschema({k: v for k, v in node.items() if k != "default"}))


def test_schema_carries_types_enums_ranges_and_status_preservation():
    version = crdgen.build_crd()["spec"]["versions"][0]
    props = version["schema"]["openAPIV3Schema"]["properties"]
    spec = props["spec"]["properties"]
    assert spec["method"]["enum"] == [m.value for m in api.Method]
    assert spec["earlyStopping"]["properties"]["criterion"]["enum"] == [c.value for c in api.CriterionName]
    assert spec["backoffLimit"] == {"type": "integer", "minimum": 0, "maximum": 100, "default": 2}
    lr = spec["training"]["properties"]["learningRate"]
    assert lr["minimum"] == 0.0 and lr["exclusiveMinimum"] is True and lr["nullable"] is True
    assert spec["resources"]["properties"]["nodeSelector"]["additionalProperties"] == {"type": "string"}
    assert "pattern" in spec["resources"]["properties"]["memory"]
    status = props["status"]
    assert status["x-kubernetes-preserve-unknown-fields"] is True
    assert status["properties"]["phase"]["enum"] == [p.value for p in api.Phase]
    assert version["subresources"] == {"status": {}}
    assert crdgen.build_crd()["spec"]["names"]["shortNames"] == ["pj"]
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase" and columns["Stop Reason"] == ".status.earlyStop.reason"
    assert {"Method", "Step", "Max Steps", "Conv", "Threshold", "Token", "Elapsed", "ETA", "Age"} <= set(columns)


def test_schema_accepts_the_example_and_rejects_what_it_can():
    validator = crd_validator(yaml.safe_load(crdgen.render()))
    good = pj_manifest("ok")
    assert list(validator.iter_errors(good)) == []
    for broken in (
        {"method": "magic"},
        {"backoffLimit": -1},
        {"training": {"learningRate": 0.0}},
        {"resources": {"memory": "lots"}},
        {"earlyStopping": {"criterion": "vibes"}},
        {"trainingg": {}},  # unknown field (strict field validation)
    ):
        bad = copy.deepcopy(good)
        bad["spec"].update(broken)
        assert list(validator.iter_errors(bad)), broken


def test_unsupported_model_shapes_fail_loudly():
    with pytest.raises(crdgen.SchemaConversionError):
        crdgen.to_structural({"anyOf": [{"type": "string"}, {"type": "integer"}]}, {}, with_defaults=False)
    with pytest.raises(crdgen.SchemaConversionError):
        crdgen.to_structural({"type": "string", "format": "date", "if": {}}, {}, with_defaults=False)
