"""The CLIP criterion prepares images the way its CLIP was trained: a transformers CLIPModel
folder through its own image processor, the tiny world's ConvClip through the tiny world's path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel

from personalize.clip_check import ClipCheck
from personalize.errors import TrainerInputError
from personalize.spec import parse_spec
from personalize.world.scoring import clip_i_score, load_tiny_clip
from personalize.world.tiny_models import TINY_WORLD_DIR, TinyConfig, build_clip

from job_specs import job_spec

# Not the identity anywhere: a resize to 40 then a 32x32 center crop of non-square images, and
# a mean and std unlike both CLIP's and the tiny world's [-1, 1] scaling.
PROCESSOR = {"size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32},
             "image_mean": [0.2, 0.5, 0.7], "image_std": [0.15, 0.3, 0.25]}


def random_images(seed: int, count: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(count)]


def clip_spec(model_path, concept_dir) -> object:
    spec = job_spec("unused-pipeline", concept_dir, "lora")
    spec["earlyStopping"] = {"criterion": "clip", "referenceBatchSize": 2, "clip": {"modelPath": str(model_path)}}
    return parse_spec(spec)


@pytest.fixture
def concept_files(tmp_path):
    folder = tmp_path / "concept"
    folder.mkdir()
    files = []
    for n, image in enumerate(random_images(1, 3)):
        image.save(folder / f"{n}.png")
        files.append(folder / f"{n}.png")
    return files


@pytest.fixture
def clip_folder(tmp_path):
    folder = tmp_path / "clip"
    build_clip(TinyConfig.test(), seed=0).save_pretrained(folder)
    CLIPImageProcessor(**PROCESSOR).save_pretrained(folder)
    return folder


def clip_i_by_hand(folder, generated, references) -> float:
    """CLIP-I straight from transformers: the folder's processor, CLIPModel's image features."""
    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPImageProcessor.from_pretrained(folder)

    def features(images):
        with torch.no_grad():
            out = model.get_image_features(pixel_values=processor(images=images, return_tensors="pt").pixel_values)
        return torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1)

    return float((features(generated) @ features(references).T).mean())


def test_a_clip_model_folder_is_scored_through_its_own_processor(clip_folder, concept_files):
    check = ClipCheck(clip_spec(clip_folder, concept_files[0].parent), "sks", concept_files, 32)
    generated = random_images(2, 2)
    references = [Image.open(p).convert("RGB") for p in concept_files]
    want = clip_i_by_hand(clip_folder, generated, references)
    assert check.similarity(generated) == pytest.approx(want, abs=1e-6)
    # the tiny world's preprocessing (a plain resize to [-1, 1]) gives this model another score
    tiny_world_path = clip_i_score(CLIPModel.from_pretrained(clip_folder).eval(), generated, references)
    assert abs(tiny_world_path - want) > 1e-3


def test_the_tiny_worlds_conv_clip_keeps_the_tiny_worlds_preprocessing(concept_files):
    check = ClipCheck(clip_spec(TINY_WORLD_DIR / "clip", concept_files[0].parent), "sks", concept_files, 32)
    generated = random_images(2, 2)
    references = [Image.open(p).convert("RGB") for p in concept_files]
    want = clip_i_score(load_tiny_clip(TINY_WORLD_DIR / "clip")[0], generated, references)
    assert check.similarity(generated) == pytest.approx(want, abs=1e-6)


def test_a_clip_model_folder_without_a_processor_is_refused(tmp_path, concept_files):
    folder = tmp_path / "bare-clip"
    build_clip(TinyConfig.test(), seed=0).save_pretrained(folder)
    with pytest.raises(TrainerInputError, match="has no preprocessor_config.json: save the model's image processor"):
        ClipCheck(clip_spec(folder, concept_files[0].parent), "sks", concept_files, 32)
