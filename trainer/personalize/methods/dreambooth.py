"""DreamBooth: fine-tune the whole UNet (optionally the text encoder too).

Prior preservation (class images, `priorLossWeight * L_prior`) is handled by the loop for every
method that enables it; see personalize/prior.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from personalize.pipeline_io import Models, sampling_pipeline
from personalize.methods.base import Method

PIPELINE_DIR = "pipeline"


def save_pipeline(models: Models, output_dir: Path) -> str:
    """The fine-tuned model as a diffusers pipeline folder (`StableDiffusionPipeline.from_pretrained`)."""
    pipe = sampling_pipeline(models)
    pipe.save_pretrained(output_dir / PIPELINE_DIR, safe_serialization=True)
    return PIPELINE_DIR


class Dreambooth(Method):
    name = "dreambooth"

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        params = list(self.models.unet.parameters())
        if self.text_encoder_trained:
            params += list(self.models.text_encoder.parameters())
        return params

    @property
    def text_encoder_trained(self) -> bool:
        return self.spec.dreambooth.train_text_encoder

    def save(self, output_dir: Path) -> list[str]:
        return [save_pipeline(self.models, output_dir)]
