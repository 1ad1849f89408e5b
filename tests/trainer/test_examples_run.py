"""Every manifest in examples/ runs end to end on CPU against a tiny model of its family, with
its mixedPrecision as written. Swapped: the base model (the builtin tiny world for SD 1.x/2.x, a
tiny random-weight SDXL or FLUX.1 pipeline for those manifests), the images (a tiny concept), the
output folder; shrunk to stay fast: the step budget, the resolution (the tiny model's), class
images and sampling steps. Everything else is the manifest's own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from accelerate.state import AcceleratorState

import tiny_families
from personalize.run import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FILES = sorted(EXAMPLES.glob("*.yaml"))
# The examples' base model folders of other families than SD 1.x/2.x, and their tiny stand-ins.
FAMILY_OF_BASE = {"stable-diffusion-xl-base-1.0": "sdxl", "FLUX.1-dev": "flux"}


@pytest.fixture(scope="module")
def family_pipelines(tmp_path_factory):
    built: dict[str, Path] = {}

    def folder(family: str) -> Path:
        if family not in built:
            built[family] = tiny_families.BUILDERS[family](tmp_path_factory.mktemp("families") / family)
        return built[family]
    return folder


def tiny_world_version(manifest: dict, concept_dir: Path, output: Path, family_pipelines=None) -> dict:
    spec = manifest["spec"]
    family = FAMILY_OF_BASE.get(spec["baseModel"].get("path", ""))
    spec["baseModel"] = {"builtin": "tiny-world"} if family is None else {"path": str(family_pipelines(family))}
    spec["concept"]["images"] = {"path": str(concept_dir)}
    spec["output"] = {"path": str(output)}
    training = spec.setdefault("training", {})
    training["maxSteps"] = 2
    training["minSteps"] = 0
    training.pop("resolution", None)
    if family is not None:
        training["resolution"] = tiny_families.RESOLUTION[family]
    if "tiDreambooth" in spec:
        spec["tiDreambooth"]["stage1MaxSteps"] = 2
    if "priorPreservation" in spec:
        spec["priorPreservation"]["numClassImages"] = 2
        spec["priorPreservation"]["inferenceSteps"] = 2
    spec["validation"] = {**spec.get("validation", {}), "numImagesPerPrompt": 1, "inferenceSteps": 2}
    return manifest


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_example_runs_on_the_tiny_world_with_its_precision(path, concept_dir, tmp_path, family_pipelines):
    AcceleratorState._reset_state(True)  # each job builds its Accelerator with its own precision
    manifest = yaml.safe_load(path.read_text())
    written = manifest["spec"].get("training", {}).get("mixedPrecision", "no")
    out = tmp_path / "out"
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(tiny_world_version(manifest, concept_dir, out, family_pipelines)))
    assert main(["--config", str(config), "--output", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["mixedPrecision"] == written
    assert result["earlyStop"]["reason"] == "MaxSteps"
    assert result["artifact"]["files"] and all((out / f).exists() for f in result["artifact"]["files"])
    AcceleratorState._reset_state(True)


def test_examples_include_each_other_family_and_run_it_on_its_tiny_pipeline():
    """An SDXL and a FLUX.1 manifest exist, and the run above swaps in a tiny pipeline of their family."""
    bases = {yaml.safe_load(p.read_text())["spec"]["baseModel"].get("path") for p in FILES}
    assert set(FAMILY_OF_BASE) <= bases
    assert set(FAMILY_OF_BASE.values()) <= set(tiny_families.BUILDERS)
