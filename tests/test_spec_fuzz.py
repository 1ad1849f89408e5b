"""Fuzz the spec validation: no input crashes it, and every rejection names a field."""

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from personalize.spec import SpecError, parse_job

# Values of every JSON type, nested a little, so that typed fields see wrong types too.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner, max_size=3),
    max_leaves=8,
)

FIELD_NAMES = [
    "baseModel", "method", "concept", "images", "path", "uri", "claimName", "classNoun", "token",
    "training", "maxSteps", "minSteps", "learningRate", "batchSize", "seed", "earlyStopping",
    "criterion", "window", "threshold", "evalEvery", "referenceBatchSize", "fixed", "holdout",
    "resources", "gpus", "memory", "tolerations", "output", "priorPreservation", "enabled",
    "validation", "prompts", "lora", "rank", "builtin", "hubId", "queueName", "backoffLimit",
]

VALID = {
    "baseModel": {"builtin": "tiny-world"},
    "method": "lora",
    "concept": {"images": {"path": "/data/x"}, "classNoun": "dog"},
}


def mutate(base, keys, values):
    """Overwrite a few (possibly nested) keys of a valid spec with arbitrary JSON values."""
    spec = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for path, value in zip(keys, values):
        target = spec
        for part in path[:-1]:
            nxt = target.get(part)
            if not isinstance(nxt, dict):
                nxt = {}
                target[part] = nxt
            target = nxt
        target[path[-1]] = value
    return spec


# A problem message starts with a dotted field path, e.g. "spec.training.maxSteps: ...".
FIELD_PATH = re.compile(r"^(spec|config|kind|apiVersion|metadata)(\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\]|\[('|\").*?\3\])*: ")


def assert_names_field(message: str) -> None:
    for problem in message.split("; "):
        assert FIELD_PATH.match(problem), f"rejection without a field path: {problem!r}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    keys=st.lists(st.lists(st.sampled_from(FIELD_NAMES), min_size=1, max_size=3), min_size=1, max_size=4),
    values=st.lists(json_values, min_size=4, max_size=4),
)
def test_mutated_specs_validate_or_name_a_field(keys, values):
    spec = mutate(VALID, keys, values)
    try:
        parse_job(spec)
    except SpecError as err:
        assert_names_field(str(err))


@settings(max_examples=200, deadline=None)
@given(doc=json_values)
def test_arbitrary_documents_never_crash(doc):
    try:
        parse_job(doc)
    except SpecError as err:
        assert_names_field(str(err))
