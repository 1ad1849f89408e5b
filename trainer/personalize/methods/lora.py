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
        unet = self.models.unet
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        # The adapter's config (rank, alpha, targets) goes into the file's metadata: without it a
        # stock `load_lora_weights` infers alpha = rank, i.e. scale 1.0 instead of alpha / rank.
        StableDiffusionPipeline.save_lora_weights(
            output_dir,
            unet_lora_layers=layers,
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
            weight_name=LORA_WEIGHTS,
            safe_serialization=True,
        )
        return [LORA_WEIGHTS]
