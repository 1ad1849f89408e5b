"""Artifacts users can take elsewhere: the kohya LoRA file (output.formats), artifact names
(output.name) and loadable snapshots (output.snapshotEvery).

The kohya file is checked against diffusers itself: its own kohya converter
(`lora_state_dict` on the kohya file) gives back exactly the diffusers file's tensors and
alpha, and its own kohya loader (`load_lora_weights`) makes the pipeline generate exactly
what loading the diffusers file makes it generate, on SD (the tiny world) and on a tiny SDXL.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file

import tiny_families
from artifact_files import artifact_content
from personalize.pipeline_io import builtin_tiny_world_folder
from personalize.run import main
from personalize.storage.uploads import artifact_files

PIPELINES = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


@pytest.fixture(scope="module")
def base_folders(tmp_path_factory):
    return {"sd": builtin_tiny_world_folder(), "sdxl": tiny_families.build_sdxl(tmp_path_factory.mktemp("sdxl") / "pipe")}


def run_job(tmp_path, base, concept_dir, method="lora", **sections) -> tuple:
    spec = {
        "baseModel": {"path": str(base)},
        "method": method,
        "concept": {"images": {"path": str(concept_dir)}, "classNoun": "triangle"},
        "training": {"maxSteps": 3, "batchSize": 2, "learningRate": 5e-2, "resolution": 32},
        "earlyStopping": {"criterion": "none", "referenceBatchSize": 2},
        "validation": {"numImagesPerPrompt": 1, "inferenceSteps": 1},
        **sections,
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    config, out = tmp_path / "job.yaml", tmp_path / "out"
    config.write_text(yaml.safe_dump(spec))
    assert main(["--config", str(config), "--output", str(out)]) == 0
    return out, json.loads((out / "result.json").read_text())


def load(family, folder):
    pipe = PIPELINES[family].from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt) -> np.ndarray:
    return pipe(prompt, num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def canonical(key: str) -> str:
    """A LoRA weight's (component, module, up/down) in one spelling, for diffusers' two: the
    peft-era names of the file save_lora_weights writes, and the attention-processor names its
    kohya converter gives (`...attn1.processor.to_out_lora.down`, `text_model...self_attn.to_q_lora.up`)."""
    key = key.replace(".processor.", ".").replace("text_model.", "")
    key = re.sub(r"self_attn\.to_(q|k|v)_lora", r"self_attn.\1_proj.lora", key)
    key = key.replace("self_attn.to_out_lora", "self_attn.out_proj.lora")
    key = re.sub(r"\.to_(q|k|v)_lora\.", r".to_\1.lora.", key).replace(".to_out_lora.", ".to_out.0.lora.")
    return key.replace(".lora_linear_layer.", ".lora.").removesuffix(".weight")


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_the_kohya_file_is_the_diffusers_lora_for_diffusers_own_kohya_loader(family, base_folders, concept_dir, tmp_path):
    folder = base_folders[family]
    out, result = run_job(tmp_path, folder, concept_dir, lora={"rank": 2, "alpha": 6, "trainTextEncoder": True},
                          output={"formats": ["diffusers", "kohya"]})
    files = result["artifact"]["files"]
    assert files == ["pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"]
    diffusers_file, kohya_file = (out / f for f in files)

    # kohya's key layout: lora_unet_ (SGM block names on SDXL), lora_te_ / lora_te1_ + lora_te2_
    kohya_keys = set(load_file(kohya_file))
    prefixes = {k.split("_")[1] for k in kohya_keys}
    assert prefixes == ({"unet", "te"} if family == "sd" else {"unet", "te1", "te2"})
    blocks = {"input", "middle", "output"} if family == "sdxl" else {"down", "mid", "up"}
    assert {k.split("_")[2] for k in kohya_keys if k.startswith("lora_unet_")} == blocks
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in kohya_keys)

    # back through diffusers' own kohya converter: the same tensors, alpha 6 on every module
    unet_config = load(family, folder).unet.config
    converted, alphas = PIPELINES[family].lora_state_dict(str(out), weight_name=kohya_file.name, unet_config=unet_config)
    original = load_file(diffusers_file)
    assert {canonical(k): v for k, v in converted.items()}.keys() == {canonical(k) for k in original}
    for key, tensor in converted.items():
        assert torch.equal(tensor, next(v for k, v in original.items() if canonical(k) == canonical(key))), key
    assert len(alphas) == len(original) // 2 and set(alphas.values()) == {6.0}

    # and through its kohya loader, the same images as from the diffusers file
    prompt = f"a photo of {result['identifier']}"
    plain = generate(load(family, folder), prompt)
    from_diffusers, from_kohya = load(family, folder), load(family, folder)
    from_diffusers.load_lora_weights(str(out), weight_name=diffusers_file.name)
    from_kohya.load_lora_weights(str(out), weight_name=kohya_file.name)
    images = generate(from_diffusers, prompt)
    assert not np.array_equal(images, plain)  # the adapters change the output
    np.testing.assert_array_equal(generate(from_kohya, prompt), images)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_the_kohya_metadata_says_what_trained_and_why_it_stopped(family, base_folders, concept_dir, tmp_path):
    out, result = run_job(tmp_path, base_folders[family], concept_dir, lora={"rank": 4, "alpha": 2},
                          output={"formats": ["kohya"], "name": "triangle-v1"},
                          training={"maxSteps": 40, "batchSize": 2, "learningRate": 5e-2, "resolution": 32},
                          earlyStopping={"criterion": "dvar", "window": 6, "threshold": 10.0, "referenceBatchSize": 2})
    assert result["artifact"]["files"] == ["triangle-v1_kohya.safetensors"]  # no diffusers file was asked for
    with safe_open(str(out / "triangle-v1_kohya.safetensors"), "pt") as f:
        metadata = f.metadata()
    early_stop = result["earlyStop"]
    assert early_stop["reason"] == "ConvergenceThreshold" and early_stop["step"] < 40  # a generous threshold stops early
    assert metadata["ss_network_module"] == "networks.lora"
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "2.0")
    assert (metadata["ss_steps"], metadata["ss_max_train_steps"]) == (str(early_stop["step"]), "40")
    assert metadata["ss_base_model_version"] == {"sd": "sd_v1", "sdxl": "sdxl_base_v1-0"}[family]
    assert metadata["modelspec.architecture"] == {"sd": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}[family]
    assert (metadata["ss_output_name"], metadata["modelspec.trigger_phrase"]) == ("triangle-v1", result["identifier"])
    assert (metadata["ss_resolution"], metadata["ss_num_train_images"]) == ("(32, 32)", "6")
    assert f"stopped early by dvar at step {early_stop['step']} of 40" in metadata["ss_training_comment"]
    decision = json.loads(metadata["personalization.earlyStop"])
    assert (decision["stopped"], decision["step"], decision["criterion"]) == (True, early_stop["step"], "dvar")


def test_a_named_lora_with_snapshots_trains_as_the_plain_run(concept_dir, tmp_path):
    """output.name and snapshotEvery change names and add files, never the training: the final
    file equals the plain run's; each snapshot loads with the stock loader."""
    base = builtin_tiny_world_folder()
    plain_out, _ = run_job(tmp_path / "plain", base, concept_dir, training={
        "maxSteps": 5, "batchSize": 2, "learningRate": 5e-2, "resolution": 32})
    out, result = run_job(tmp_path / "named", base, concept_dir, output={
        "name": "mydog", "snapshotEvery": 2, "formats": ["diffusers", "kohya"]}, training={
        "maxSteps": 5, "batchSize": 2, "learningRate": 5e-2, "resolution": 32})
    artifact = result["artifact"]
    assert artifact["files"] == ["mydog.safetensors", "mydog_kohya.safetensors"]
    assert artifact["snapshots"] == ["mydog-step00002.safetensors", "mydog-step00004.safetensors",
                                     "mydog_kohya-step00002.safetensors", "mydog_kohya-step00004.safetensors"]
    assert artifact_content(out / "mydog.safetensors") == artifact_content(plain_out / "pytorch_lora_weights.safetensors")
    assert {*artifact["files"], *artifact["snapshots"]} <= set(artifact_files(out))  # all uploaded with output.uri
    assert not (out / ".saving").exists()

    prompt = f"a photo of {result['identifier']}"
    images = {}
    for name in ["mydog-step00002.safetensors", "mydog_kohya-step00004.safetensors", "mydog.safetensors"]:
        pipe = load("sd", base)
        pipe.load_lora_weights(str(out), weight_name=name)
        images[name] = generate(pipe, prompt)
    assert len({img.tobytes() for img in images.values()}) == 3  # steps 2, 4 and 5 differ
    with safe_open(str(out / "mydog_kohya-step00004.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "4" and "personalization.earlyStop" not in f.metadata()


def test_named_textual_inversion_snapshots_load_with_the_stock_loader(concept_dir, tmp_path):
    base = builtin_tiny_world_folder()
    out, result = run_job(tmp_path, base, concept_dir, method="textualInversion", output={"name": "tri", "snapshotEvery": 2},
                          training={"maxSteps": 3, "batchSize": 2, "learningRate": 5e-2, "resolution": 32})
    assert result["artifact"]["files"] == ["tri_learned_embeds.safetensors"]
    assert result["artifact"]["snapshots"] == ["tri_learned_embeds-step00002.safetensors"]
    token = result["identifier"]
    rows = [load_file(out / name)[token] for name in ("tri_learned_embeds-step00002.safetensors", "tri_learned_embeds.safetensors")]
    assert not torch.equal(*rows)  # step 2's embedding, then step 3's
    pipe = load("sd", base)
    pipe.load_textual_inversion(str(out / "tri_learned_embeds.safetensors"), token=token)
    assert not np.array_equal(generate(pipe, f"a photo of {token}"), generate(load("sd", base), f"a photo of {token}"))


def test_named_custom_diffusion_loads_with_its_names(concept_dir, tmp_path):
    from personalize.methods import load_custom_diffusion

    base = builtin_tiny_world_folder()
    out, result = run_job(tmp_path, base, concept_dir, method="customDiffusion", output={"name": "tri"},
                          training={"maxSteps": 2, "batchSize": 2, "learningRate": 5e-2, "resolution": 32})
    files = result["artifact"]["files"]
    assert files == ["tri_pytorch_custom_diffusion_weights.safetensors", "tri_learned_embeds.safetensors"]
    token = result["identifier"]
    pipe = load("sd", base)
    load_custom_diffusion(pipe, out, token, weight_name=files[0], embeds_name=files[1])
    assert not np.array_equal(generate(pipe, f"a photo of {token}"), generate(load("sd", base), f"a photo of {token}"))
