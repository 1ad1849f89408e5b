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
        family, denoiser = self.models.family, self.models.denoiser
        metadata = denoiser.peft_config["default"].to_dict()
        # peft keeps target_modules as a set, whose order changes from one process to the next:
        # sorted, the same weights always give the same file (a resumed run's is byte-identical).
        metadata["target_modules"] = sorted(metadata["target_modules"])
        # The adapter's config (rank, alpha, targets) goes into the file's metadata: without it a
        # stock `load_lora_weights` infers alpha = rank, i.e. scale 1.0 instead of alpha / rank.
        family.save_lora(output_dir, LORA_WEIGHTS, family.lora_layers(denoiser),
                         adapter_metadata=metadata)
        return [LORA_WEIGHTS]
