"""The spec fingerprint: which spec a checkpoint was written for.

A resumed run must compute what the interrupted one computed, so a checkpoint is refused when
the fields that decide the training trajectory changed. Fields that only decide where and when
the trainer runs are left out, and a refusal names the fields that differ.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Spec fields that decide where and when the trainer runs, not what it computes: changing them
# between a preemption and the resume (more memory, another queue, a new image tag with the same
# trainer) must not throw the progress away. Everything else is part of the fingerprint.
PLACEMENT_FIELDS = (
    "resources",
    "image",
    "queueName",
    "activeDeadlineSeconds",
    "backoffLimit",
    "ttlSecondsAfterFinished",
)
PLACEMENT_TRAINING_FIELDS = ("checkpointEvery",)


def fingerprinted_spec(spec: Any) -> dict[str, Any]:
    """The part of the spec that decides the training trajectory, as a camelCase JSON dict.

    Accepts a `PersonalizationJob`, a `PersonalizationJobSpec` or an already camelCase dict.
    Defaults are resolved by the model, so an explicit default and an omitted field are equal.
    """
    if hasattr(spec, "spec") and hasattr(spec, "kind"):  # a full PersonalizationJob
        spec = spec.spec
    data = spec.to_api() if hasattr(spec, "to_api") else json.loads(json.dumps(dict(spec)))
    data = {k: v for k, v in data.items() if k not in PLACEMENT_FIELDS}
    if isinstance(data.get("training"), dict):
        data["training"] = {k: v for k, v in data["training"].items() if k not in PLACEMENT_TRAINING_FIELDS}
    return data


def spec_fingerprint(spec: Any) -> str:
    """sha256 of the canonical JSON of `fingerprinted_spec(spec)`."""
    canonical = json.dumps(fingerprinted_spec(spec), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def differing_fields(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON values differ (for the refusal message)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += differing_fields(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if a == b else [prefix or "(spec)"]
