"""Random-weight tiny pipeline folders that other tests build in seconds."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from personalize.world import tiny_models


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    return tiny_models.build_tiny_pipeline_folder(tmp_path_factory.mktemp("tiny") / "pipe", seed=0)


def test_folder_has_stable_diffusion_layout(pipeline_folder):
    index = json.loads((pipeline_folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (pipeline_folder / part).is_dir()
    assert index["safety_checker"] == [None, None]
    assert index["feature_extractor"] == [None, None]


def test_folder_loads_and_generates_a_32px_image(pipeline_folder):
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_folder)
    pipe.set_progress_bar_config(disable=True)
    assert len(pipe.tokenizer) == 49408
    assert tiny_models.count_parameters(pipe.unet) < 1_500_000
    image = pipe(
        "a red striped triangle", num_inference_steps=2, height=32, width=32, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.shape == (32, 32, 3)
    assert np.isfinite(image).all()


def test_same_seed_gives_same_weights():
    a = tiny_models.build_unet(tiny_models.TinyConfig.test(), seed=3).state_dict()
    b = tiny_models.build_unet(tiny_models.TinyConfig.test(), seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_text_encoder_from_clip_reproduces_the_clip_text_tower():
    cfg = tiny_models.TinyConfig.test()
    clip = tiny_models.build_clip(cfg, seed=1).eval()
    text_encoder = tiny_models.text_encoder_from_clip(clip).eval()
    ids = tiny_models.load_tokenizer()(["a blue dotted star"], return_tensors="pt").input_ids
    with torch.no_grad():
        expected = clip.text_model(input_ids=ids).last_hidden_state
        actual = text_encoder(input_ids=ids).last_hidden_state
    assert torch.allclose(expected, actual)
    # Conditioning dimension of the UNet matches the text encoder's hidden size.
    assert tiny_models.build_unet(cfg).config.cross_attention_dim == text_encoder.config.hidden_size


def test_conv_clip_saves_loads_and_gives_the_pipeline_its_text_tower(tmp_path):
    from personalize.world.scoring import image_embeddings, load_tiny_clip, text_embeddings

    cfg = tiny_models.TinyConfig.test()
    clip = tiny_models.build_conv_clip(cfg, seed=2)
    clip.train()  # move the batch-norm statistics off their initial values
    with torch.no_grad():
        clip.get_image_features(torch.rand(8, 3, 32, 32) * 2 - 1)
    clip.eval()
    clip.save_pretrained(tmp_path / "clip")
    loaded, tokenizer = load_tiny_clip(tmp_path / "clip")
    images = [np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    assert torch.allclose(image_embeddings(loaded, images), image_embeddings(clip, images), atol=1e-6)
    assert torch.allclose(text_embeddings(loaded, tokenizer, ["a red star"]), text_embeddings(clip, tokenizer, ["a red star"]))
    assert image_embeddings(loaded, images).shape == (3, cfg.projection_dim)

    text_encoder = tiny_models.text_encoder_from_clip(loaded).eval()
    ids = tokenizer(["a blue dotted star"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(text_encoder(input_ids=ids).last_hidden_state,
                              loaded.text_model(input_ids=ids).last_hidden_state)

    # A weights file that does not match its config is refused, not half-loaded.
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "clip" / "model.safetensors")
    weights.pop("image_projection.weight")
    save_file(weights, tmp_path / "clip" / "model.safetensors")
    with pytest.raises(ValueError, match="image_projection.weight"):
        load_tiny_clip(tmp_path / "clip")


def test_latents_are_8x8_for_32px_images():
    cfg = tiny_models.TinyConfig.test()
    vae = tiny_models.build_vae(cfg)
    with torch.no_grad():
        latents = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean
    assert latents.shape == (1, 4, cfg.latent_size, cfg.latent_size) == (1, 4, 8, 8)
