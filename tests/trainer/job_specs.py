"""The small, fast job spec that trainer tests start from (a module of its own, not conftest:
`from conftest import` resolves to whichever conftest pytest put first on sys.path)."""

from __future__ import annotations

from pathlib import Path


def job_spec(pipeline_dir: Path, concept_dir: Path, method: str, **overrides) -> dict:
    """A small, fast job spec (camelCase dict); `overrides` replace top-level sections."""
    spec = {
        "baseModel": {"path": str(pipeline_dir)},
        "method": method,
        "concept": {"images": {"path": str(concept_dir)}, "classNoun": "triangle"},
        "training": {"maxSteps": 3, "batchSize": 2, "learningRate": 1e-2},
        # L_det at every step (not the spec's default evalEvery 4): the tests read each step's value
        "earlyStopping": {"window": 4, "referenceBatchSize": 2, "evalEvery": 1},
        "priorPreservation": {"enabled": False},
        "validation": {"numImagesPerPrompt": 1, "inferenceSteps": 2},
    }
    if method in ("textualInversion", "tiDreambooth"):
        del spec["priorPreservation"]
    if method == "tiDreambooth":
        spec["tiDreambooth"] = {"stage1MaxSteps": 2, "stage1LearningRate": 1e-2, "stage1Window": 4}
    spec.update(overrides)
    return spec
