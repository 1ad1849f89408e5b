"""The CLIP baseline criterion's measurement (the paper's comparison, expensive by design):
every `everySteps` steps, generate samples of the concept prompt with the current weights and
score their CLIP image similarity (CLIP-I) to the concept's images.

Images reach the CLIP prepared as it was trained: a transformers `CLIPModel` folder brings its
own image processor (`preprocessor_config.json`: resize, center crop, CLIP's mean and std), and
the tiny world's ConvClip takes the tiny world's plain resize to [-1, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from personalize.data import fill_template
from personalize.errors import TrainerInputError
from personalize.pipeline_io import TINY_WORLD_DIR, Models, sampling_pipeline
from personalize.preflight import resolve_volume_path
from personalize.spec import PersonalizationJobSpec


def clip_model_folder(spec: PersonalizationJobSpec) -> Path:
    options = spec.early_stopping.clip
    if options.model_path:
        return resolve_volume_path(options.model_path, None)
    if spec.base_model.builtin:
        return TINY_WORLD_DIR / "clip"
    raise TrainerInputError("earlyStopping.clip.modelPath: criterion clip needs a CLIP model folder")


Preprocess = Callable[[Sequence[Image.Image]], torch.Tensor]  # images -> (N, 3, H, W) pixel values

PROCESSOR_FILE = "preprocessor_config.json"  # what `save_pretrained` of an image processor writes


def load_clip_scorer(folder: Path) -> tuple[torch.nn.Module, Preprocess]:
    """The CLIP model in `folder` (float32, eval mode) and the preprocessing it expects."""
    from transformers import AutoImageProcessor, CLIPModel

    from personalize.world.conv_clip import is_conv_clip_folder
    from personalize.world.scoring import clip_image_size, images_to_pixels, load_tiny_clip

    where = f"earlyStopping.clip.modelPath {str(folder)!r}"
    if not (folder / PROCESSOR_FILE).is_file() and not is_conv_clip_folder(folder):
        # Guessing would score every check on wrongly prepared images, and the stop follows them.
        raise TrainerInputError(f"{where} has no {PROCESSOR_FILE}: save the model's image processor with it "
                                "(CLIPProcessor or CLIPImageProcessor save_pretrained into the same folder)")
    try:
        if is_conv_clip_folder(folder):
            clip, _ = load_tiny_clip(folder)
            size = clip_image_size(clip)
            return clip, lambda images: images_to_pixels(images, size)
        clip = CLIPModel.from_pretrained(folder, dtype=torch.float32).eval()
        processor = AutoImageProcessor.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise TrainerInputError(f"{where} cannot be loaded: {err}") from None
    return clip, lambda images: processor(images=list(images), return_tensors="pt")["pixel_values"]


class ClipCheck:
    def __init__(self, spec: PersonalizationJobSpec, prompt_token: str, concept_files: list[Path], resolution: int):
        self.clip, self.preprocess = load_clip_scorer(clip_model_folder(spec))
        self.options = spec.early_stopping.clip
        self.prompt = fill_template(spec.validation.prompts[0], prompt_token, spec.concept.class_noun)
        self.references = self.embed([Image.open(p).convert("RGB") for p in concept_files])
        self.resolution = resolution
        self.seed = spec.training.seed

    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(N, projection_dim) L2-normalised image embeddings."""
        from personalize.world.scoring import image_embeddings

        return image_embeddings(self.clip, self.preprocess(images))

    def similarity(self, images: Sequence[Image.Image]) -> float:
        """CLIP-I: mean cosine similarity between these images and the concept's images."""
        return float((self.embed(images) @ self.references.T).mean())

    @torch.no_grad()
    def score(self, models: Models) -> float:
        was_training = models.unet.training, models.text_encoder.training
        pipe = sampling_pipeline(models)
        try:
            images = pipe(
                self.prompt,
                num_images_per_prompt=self.options.num_samples,
                height=self.resolution,
                width=self.resolution,
                num_inference_steps=self.options.inference_steps,
                generator=torch.Generator().manual_seed(self.seed),  # same noise at every check
            ).images
        finally:
            models.unet.train(was_training[0])
            models.text_encoder.train(was_training[1])
        return self.similarity(images)
