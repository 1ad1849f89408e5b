"""LoRA: low-rank adapters (peft) on the UNet's attention projections; the base weights stay frozen."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from personalize.methods.base import Method

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


class Lora(Method):
    name = "lora"

    def prepare(self) -> None:
        options = self.spec.lora
        config = LoraConfig(
            r=options.rank,
            lora_alpha=options.alpha or options.rank,
            init_lora_weights="gaussian",  # A gaussian, B zero: training starts at the base model
            target_modules=list(options.target_modules),
        )
        self.models.unet.add_adapter(config)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for name, p in self.models.unet.named_parameters() if "lora_" in name]

    def save(self, output_dir: Path) -> list[str]:
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.models.unet))
        StableDiffusionPipeline.save_lora_weights(
            output_dir, unet_lora_layers=layers, weight_name=LORA_WEIGHTS, safe_serialization=True
        )
        files = [LORA_WEIGHTS]
        if self.identifier.added:
            # A user-given token is a new word: ship its (initial) embedding so prompts can use it.
            files.append(self.save_learned_embeds(output_dir))
        return files
