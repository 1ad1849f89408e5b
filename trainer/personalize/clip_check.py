"""The CLIP baseline criterion's measurement (the paper's comparison, expensive by design):
every `everySteps` steps, generate samples of the concept prompt with the current weights and
score their CLIP image similarity (CLIP-I) to the concept's images."""

from __future__ import annotations

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


class ClipCheck:
    def __init__(self, spec: PersonalizationJobSpec, prompt_token: str, concept_files: list[Path], resolution: int):
        from personalize.world.scoring import load_tiny_clip

        folder = clip_model_folder(spec)
        try:
            self.clip, _ = load_tiny_clip(folder)
        except (OSError, ValueError) as err:
            raise TrainerInputError(f"earlyStopping.clip.modelPath {str(folder)!r} cannot be loaded: {err}") from None
        self.options = spec.early_stopping.clip
        self.prompt = fill_template(spec.validation.prompts[0], prompt_token, spec.concept.class_noun)
        self.references = [Image.open(p).convert("RGB") for p in concept_files]
        self.resolution = resolution
        self.seed = spec.training.seed

    @torch.no_grad()
    def score(self, models: Models) -> float:
        from personalize.world.scoring import clip_i_score

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
        return clip_i_score(self.clip, images, self.references)
