"""The pretrained tiny world checked into assets/tiny_world (skipped until it exists)."""

import json

import pytest
import torch
from safetensors import safe_open

from personalize.world.tiny_models import TINY_WORLD_DIR

pytestmark = pytest.mark.skipif(
    not (TINY_WORLD_DIR / "model_index.json").exists(), reason="pretrained tiny world not built yet"
)


def test_all_weights_are_fp16_safetensors():
    files = sorted(TINY_WORLD_DIR.rglob("*.safetensors"))
    parts = {f.parent.name for f in files}
    assert {"unet", "vae", "text_encoder", "clip"} <= parts
    assert not list(TINY_WORLD_DIR.rglob("*.bin"))
    for file in files:
        with safe_open(file, framework="pt") as weights:
            for key in weights.keys():
                assert weights.get_slice(key).get_dtype() == "F16", f"{file.name}:{key}"


def test_world_is_well_under_50_mb():
    total = sum(f.stat().st_size for f in TINY_WORLD_DIR.rglob("*") if f.is_file())
    assert total < 50e6


def test_pipeline_and_clip_load():
    from diffusers import StableDiffusionPipeline
    from personalize.world.scoring import load_tiny_clip

    pipe = StableDiffusionPipeline.from_pretrained(TINY_WORLD_DIR, dtype=torch.float32)
    assert json.loads((TINY_WORLD_DIR / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    clip, _ = load_tiny_clip()
    # The pipeline's text encoder is the CLIP's text tower.
    ids = pipe.tokenizer(["a red circle"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(
            pipe.text_encoder(ids).last_hidden_state, clip.text_model(input_ids=ids).last_hidden_state, atol=1e-3
        )
