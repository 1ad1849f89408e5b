"""LoRA: low-rank adapters (peft) on the denoiser's attention projections (the UNet of SD/SDXL,
the transformer of SD3/FLUX.1); the base weights stay frozen. The default target modules are
the model family's (those of diffusers' LoRA scripts)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig

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
            target_modules=list(options.target_modules or self.models.family.lora_target_modules),
        )
        self.models.denoiser.add_adapter(config)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for name, p in self.models.denoiser.named_parameters() if "lora_" in name]

    def save(self, output_dir: Path) -> list[str]:
        family = self.models.family
        family.save_lora(output_dir, LORA_WEIGHTS, family.lora_layers(self.models.denoiser))
        files = [LORA_WEIGHTS]
        if self.identifier.added:
            # A user-given token is a new word: ship its (initial) embedding so prompts can use it.
            files.append(self.save_learned_embeds(output_dir))
        return files
