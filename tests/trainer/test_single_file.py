"""A base model given as one checkpoint file (`baseModel.path: model.safetensors` or `.ckpt`) in
the original layout, with its pipeline's configs from `baseModel.config`: loaded offline by
diffusers' `from_single_file` into exactly the weights of the folder it was written from, and a
job trained from it trains exactly as the job trained from the folder."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from job_specs import job_spec
from personalize.errors import TrainerInputError
from personalize.pipeline_io import load_base_pipeline
from personalize.run import main
from personalize.spec import BaseModelSource
from single_file import original_checkpoint


@pytest.fixture(scope="module")
def single_file(tiny_pipeline_dir, tmp_path_factory):
    """The tiny pipeline as model.safetensors and model.ckpt, and its config folder (no weights)."""
    root = tmp_path_factory.mktemp("single")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, dtype=torch.float32, safety_checker=None)
    state = original_checkpoint(pipe)
    save_file(state, str(root / "model.safetensors"))
    torch.save({"state_dict": state}, root / "model.ckpt")  # the usual .ckpt nesting
    shutil.copytree(tiny_pipeline_dir, root / "config", ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return root


@pytest.mark.parametrize("name, pickled", [("model.safetensors", False), ("model.ckpt", True)])
def test_a_single_file_loads_into_the_folders_weights(single_file, tiny_pipeline_dir, name, pickled):
    source = BaseModelSource(path=str(single_file / name), config=str(single_file / "config"), allowPickleWeights=pickled)
    loaded = load_base_pipeline(source)
    folder = load_base_pipeline(BaseModelSource(path=str(tiny_pipeline_dir)))
    assert not any(single_file.joinpath("config").rglob("*.safetensors"))  # the weights came from the file
    for part in ("unet", "vae", "text_encoder"):
        want, got = getattr(folder, part).state_dict(), getattr(loaded, part).state_dict()
        assert want.keys() == got.keys(), part
        assert all(torch.equal(want[k], got[k]) for k in want), part
        assert {v.dtype for v in got.values()} == {torch.float32}
    assert loaded.scheduler.config == folder.scheduler.config


def run(tmp_path, base_model: dict, concept_dir, tiny_pipeline_dir) -> tuple[list[dict], dict]:
    spec = job_spec(tiny_pipeline_dir, concept_dir, "lora", baseModel=base_model)
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["--config", str(tmp_path / "job.yaml"), "--output", str(tmp_path / "out")]) == 0
    with (tmp_path / "out" / "losses.csv").open() as f:
        return list(csv.DictReader(f)), json.loads((tmp_path / "out" / "result.json").read_text())


def test_a_job_from_the_single_file_trains_as_the_job_from_the_folder(single_file, tiny_pipeline_dir, concept_dir, tmp_path):
    from_folder, _ = run(tmp_path / "folder", {"path": str(tiny_pipeline_dir)}, concept_dir, tiny_pipeline_dir)
    from_file, result = run(tmp_path / "file", {"path": str(single_file / "model.safetensors"),
                                                "config": str(single_file / "config")}, concept_dir, tiny_pipeline_dir)
    assert [r["deterministic_loss"] for r in from_file] == [r["deterministic_loss"] for r in from_folder]
    assert [r["train_loss"] for r in from_file] == [r["train_loss"] for r in from_folder]
    assert result["artifact"]["files"] == ["pytorch_lora_weights.safetensors"]


def test_single_file_problems_are_named(single_file, tmp_path):
    with pytest.raises(TrainerInputError, match="set baseModel.config to a folder"):
        load_base_pipeline(BaseModelSource(path=str(single_file / "model.safetensors")))
    with pytest.raises(TrainerInputError, match=r"\.ckpt\), which loads only with baseModel.allowPickleWeights: true"):
        load_base_pipeline(BaseModelSource(path=str(single_file / "model.ckpt"), config=str(single_file / "config")))
    with pytest.raises(TrainerInputError, match="is not a pipeline config folder"):
        load_base_pipeline(BaseModelSource(path=str(single_file / "model.safetensors"), config=str(tmp_path)))
    broken = tmp_path / "broken.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(broken))
    with pytest.raises(TrainerInputError, match="cannot be loaded as a Stable Diffusion 1.x/2.x checkpoint") as err:
        load_base_pipeline(BaseModelSource(path=str(broken), config=str(single_file / "config")))
    assert "\n" not in str(err.value)
