"""Generate the PersonalizationJob CustomResourceDefinition from the shared pydantic model.

`python -m pj_operator.crdgen` writes `crds/personalizationjobs.yaml`; `--check` exits non-zero
when the file on disk differs from what the model generates (a test does the same).

Pydantic emits JSON Schema (draft 2020-12); Kubernetes wants a *structural* OpenAPI v3 schema:
every node typed, no $ref, no anyOf/oneOf carrying types, no `additionalProperties: false`,
`exclusiveMinimum` as a boolean beside `minimum`, `nullable` instead of `type: null`.
`to_structural` does that translation and refuses anything it does not understand, so a new
kind of field in the model fails here instead of producing a CRD the API server rejects.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from personalize import spec as api

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / f"{api.PLURAL}.yaml"

# JSON Schema keywords that pass through unchanged (all valid in a structural schema).
_COPIED = ("description", "minimum", "maximum", "minLength", "maxLength", "pattern", "minItems",
           "maxItems", "enum")
# Keywords pydantic emits that carry no validation meaning for the API server.
_DROPPED = ("title", "$defs", "format", "examples")

# Labels are the only place the job name is copied to: Kubernetes caps label values at 63 chars.
MAX_NAME_LENGTH = 63


class SchemaConversionError(ValueError):
    pass


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline a `$ref` (and pydantic's `allOf: [{$ref}]` wrapper), keeping sibling keys."""
    node = dict(node)
    if "allOf" in node:
        parts = node.pop("allOf")
        if len(parts) != 1:
            raise SchemaConversionError(f"allOf with {len(parts)} members is not supported")
        node = {**_resolve(parts[0], defs), **node}
    if "$ref" in node:
        ref = node.pop("$ref")
        name = ref.removeprefix("#/$defs/")
        if name not in defs:
            raise SchemaConversionError(f"unresolvable reference {ref}")
        node = {**_resolve(defs[name], defs), **node}
    return node


def to_structural(node: dict[str, Any], defs: dict[str, Any], *, with_defaults: bool) -> dict[str, Any]:
    """Translate one pydantic JSON Schema node (and its children) into a structural schema node."""
    node = _resolve(node, defs)
    out: dict[str, Any] = {}

    if "anyOf" in node:
        variants = [_resolve(v, defs) for v in node.pop("anyOf")]
        non_null = [v for v in variants if v.get("type") != "null"]
        if len(non_null) != 1 or len(non_null) == len(variants):
            raise SchemaConversionError(f"only Optional[X] unions are supported, got {variants}")
        # Keys on the wrapper (description, default) win over the variant's.
        node = {**non_null[0], **node}
        out["nullable"] = True

    if "const" in node:
        node.setdefault("enum", [node.pop("const")])

    kind = node.get("type")
    if kind is None and "enum" in node:
        kinds = {type(v) for v in node["enum"]}
        kind = {str: "string", int: "integer", float: "number", bool: "boolean"}.get(kinds.pop()) if len(kinds) == 1 else None
    if kind is None:
        # `dict[str, Any]` items and the like: an untyped value is only allowed as opaque object.
        if node.get("additionalProperties") is True or node == {} or set(node) <= {"description"}:
            kind = "object"
        else:
            raise SchemaConversionError(f"schema node without a type: {node}")
    out["type"] = kind

    for key in _COPIED:
        if key in node:
            out[key] = node[key]
    if "exclusiveMinimum" in node:
        out["minimum"] = node["exclusiveMinimum"]
        out["exclusiveMinimum"] = True
    if "exclusiveMaximum" in node:
        out["maximum"] = node["exclusiveMaximum"]
        out["exclusiveMaximum"] = True

    if kind == "object":
        props = node.get("properties")
        extra = node.get("additionalProperties")
        if props:
            out["properties"] = {
                name: to_structural(sub, defs, with_defaults=with_defaults) for name, sub in props.items()
            }
            if node.get("required"):
                out["required"] = list(node["required"])
            if extra is True:
                # extra="allow" (status: kopf keeps its bookkeeping there).
                out["x-kubernetes-preserve-unknown-fields"] = True
        elif isinstance(extra, dict):
            out["additionalProperties"] = to_structural(extra, defs, with_defaults=with_defaults)
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True
        # `additionalProperties: false` is not allowed beside properties: the API server prunes
        # unknown fields instead (and `kubectl --validate=strict` rejects them).
    elif kind == "array":
        out["items"] = to_structural(node.get("items", {}), defs, with_defaults=with_defaults)

    default = node.get("default")
    if with_defaults and default is not None and not isinstance(default, (dict, list)):
        out["default"] = default
    elif with_defaults and isinstance(default, list) and default:
        out["default"] = default

    unknown = set(node) - set(_COPIED) - set(_DROPPED) - {
        "type", "properties", "required", "additionalProperties", "items", "default",
        "exclusiveMinimum", "exclusiveMaximum", "anyOf", "const",
    }
    if unknown:
        raise SchemaConversionError(f"unsupported JSON Schema keywords {sorted(unknown)} in {node}")
    return {"type": out.pop("type"), **out}  # type first: easier to read in the YAML


def model_schema(model: type, *, with_defaults: bool) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return to_structural(raw, raw.get("$defs", {}), with_defaults=with_defaults)


def status_schema() -> dict[str, Any]:
    schema = model_schema(api.PersonalizationJobStatus, with_defaults=False)
    # Kopf may write its own progress under status.kopf (and handler results); keep it.
    schema["x-kubernetes-preserve-unknown-fields"] = True
    schema["properties"]["kopf"] = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    # Conditions are keyed by type: merge-friendly for server-side apply.
    conditions = schema["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    return schema


def open_api_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": model_schema(api.PersonalizationJobSpec, with_defaults=True),
            "status": status_schema(),
        },
        "x-kubernetes-validations": [
            {
                "rule": f"self.metadata.name.size() <= {MAX_NAME_LENGTH}",
                "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters "
                "(it is copied into label values)",
            }
        ],
    }


# `kubectl get pj` fits 120 columns for names up to 16 characters (a 9-character token, 6-digit
# steps); priority 1 columns are `-o wide` only. "Conv" is the criterion's value, read against
# the threshold beside it.
PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step"},
    {"name": "Conv", "type": "number", "jsonPath": ".status.convergenceValue",
     "description": "Last value of the convergence criterion (stops below the threshold)."},
    {"name": "Threshold", "type": "number", "jsonPath": ".status.convergenceThreshold"},
    {"name": "Token", "type": "string", "jsonPath": ".status.identifier",
     "description": "The identifier to put in every prompt."},
    {"name": "Elapsed", "type": "string", "jsonPath": ".status.progress.elapsed"},
    {"name": "ETA", "type": "string", "jsonPath": ".status.progress.eta",
     "description": "To maxSteps at the pace so far (the criterion may stop earlier); empty once ended."},
    {"name": "Stop Reason", "type": "string", "jsonPath": ".status.earlyStop.reason"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Pack", "type": "string", "jsonPath": ".status.pack.job", "priority": 1,
     "description": "The pack (shared Job and pod) the job trains in; empty for a pod of its own."},
    {"name": "Method", "type": "string", "jsonPath": ".spec.method", "priority": 1},
    {"name": "Max Steps", "type": "integer", "jsonPath": ".status.progress.maxSteps", "priority": 1},
    {"name": "Samples", "type": "string", "jsonPath": ".status.samples", "priority": 1},
    {"name": "Job", "type": "string", "jsonPath": ".status.jobName", "priority": 1},
]


def build_crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.API_GROUP}",
            "labels": {"app.kubernetes.io/name": "personalization-operator"},
        },
        "spec": {
            "group": api.API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": [api.SHORT_NAME],
            },
            "versions": [
                {
                    "name": api.API_VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": open_api_schema()},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }


HEADER = "# Generated by `python -m pj_operator.crdgen` from personalize.spec. Do not edit.\n"


def render() -> str:
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=CRD_PATH)
    parser.add_argument("--check", action="store_true", help="fail if the file differs from the model")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date: run python -m pj_operator.crdgen", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
