"""Every manifest in examples/ runs end to end on CPU against the tiny world, with its
mixedPrecision as written. Swapped: the base model (the builtin tiny world), the images (a tiny
concept), the output folder; shrunk to stay fast: the step budget, the resolution (the tiny
world's own), class images and sampling steps. Everything else is the manifest's own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from accelerate.state import AcceleratorState

from personalize.run import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FILES = sorted(EXAMPLES.glob("*.yaml"))


def tiny_world_version(manifest: dict, concept_dir: Path, output: Path) -> dict:
    spec = manifest["spec"]
    spec["baseModel"] = {"builtin": "tiny-world"}
    spec["concept"]["images"] = {"path": str(concept_dir)}
    spec["output"] = {"path": str(output)}
    training = spec.setdefault("training", {})
    training["maxSteps"] = 2
    training["minSteps"] = 0
    training.pop("resolution", None)
    if "tiDreambooth" in spec:
        spec["tiDreambooth"]["stage1MaxSteps"] = 2
    if "priorPreservation" in spec:
        spec["priorPreservation"]["numClassImages"] = 2
        spec["priorPreservation"]["inferenceSteps"] = 2
    spec["validation"] = {**spec.get("validation", {}), "numImagesPerPrompt": 1, "inferenceSteps": 2}
    return manifest


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_example_runs_on_the_tiny_world_with_its_precision(path, concept_dir, tmp_path):
    AcceleratorState._reset_state(True)  # each job builds its Accelerator with its own precision
    manifest = yaml.safe_load(path.read_text())
    written = manifest["spec"].get("training", {}).get("mixedPrecision", "no")
    out = tmp_path / "out"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(tiny_world_version(manifest, concept_dir, out)))
    assert main(["--config", str(config), "--output", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["mixedPrecision"] == written
    assert result["earlyStop"]["reason"] == "MaxSteps"
    assert result["artifact"]["files"] and all((out / f).exists() for f in result["artifact"]["files"])
    AcceleratorState._reset_state(True)
