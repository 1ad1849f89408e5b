"""LoRA: low-rank adapters (peft) on the denoiser's attention projections (the UNet of SD/SDXL,
the transformer of SD3/FLUX.1); the base weights stay frozen. The default target modules are
the model family's (those of diffusers' LoRA scripts). With `lora.trainTextEncoder` the text
encoders that read the identifier get adapters too (SDXL: both), saved in the same file under
the names the stock `load_lora_weights` reads (text_encoder, text_encoder_2)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model

from personalize.methods.base import Method
from personalize.routing import DENOISER, TEXT, route_lora_layers

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


class Lora(Method):
    name = "lora"
    packable = True

    def _config(self, target_modules) -> LoraConfig:
        options = self.spec.lora
        return LoraConfig(
            r=options.rank,
            lora_alpha=options.alpha or options.rank,
            init_lora_weights="gaussian",  # A gaussian, B zero: training starts at the base model
            target_modules=list(target_modules),
        )

    def adapted(self) -> dict[str, torch.nn.Module]:
        """The modules with adapters, by pipeline component name."""
        family = self.models.family
        modules = {family.denoiser_component: self.models.denoiser}
        if self.text_encoder_trained:
            modules |= {e.name: e.module for e in family.identifier_encoders(self.models)}
        return modules

    def prepare(self) -> None:
        family = self.models.family
        # one adapter per concept, named by its route; the routing hands each layer its rows' adapter
        self.models.denoiser.add_adapter(self._config(self.spec.lora.target_modules or family.lora_target_modules),
                                         adapter_name=self.route)
        route_lora_layers(self.models.denoiser, self.routing, DENOISER)
        if self.text_encoder_trained:
            for encoder in family.identifier_encoders(self.models):
                # peft's injection itself: transformers' `add_adapter` wraps it but refuses peft < 0.22
                # (a version gate only; the stock loader's `load_adapter` has none).
                inject_adapter_in_model(self._config(family.text_encoder_lora_target_modules), encoder.module,
                                        adapter_name=self.route)
                route_lora_layers(encoder.module, self.routing, TEXT)

    @property
    def text_encoder_trained(self) -> bool:
        return self.spec.lora.train_text_encoder

    def train_modules(self) -> list[torch.nn.Module]:
        return list(self.adapted().values())

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for module in self.adapted().values() for name, p in module.named_parameters()
                if "lora_" in name and f".{self.route}." in name]

    def save(self, output_dir: Path) -> list[str]:
        family = self.models.family
        adapters = {}
        for component, module in self.adapted().items():
            metadata = module.peft_config[self.route].to_dict()
            # peft keeps target_modules as a set, whose order changes from one process to the next:
            # sorted, the same weights always give the same metadata (a resumed run's equals the straight run's).
            metadata["target_modules"] = sorted(metadata["target_modules"])
            # The adapter's config (rank, alpha, targets) goes into the file's metadata: without it a
            # stock `load_lora_weights` infers alpha = rank, i.e. scale 1.0 instead of alpha / rank.
            adapters[component] = (family.lora_layers(module, self.route), metadata)
        family.save_lora(output_dir, LORA_WEIGHTS, adapters)
        return [LORA_WEIGHTS]

    def release(self) -> None:
        """Delete this concept's adapter from every adapted layer (the pack goes on without it)."""
        from peft.tuners.lora import LoraLayer  # noqa: PLC0415

        for module in self.adapted().values():
            for layer in module.modules():
                if isinstance(layer, LoraLayer) and self.route in layer.lora_A:
                    layer.delete_adapter(self.route)
            getattr(module, "peft_config", {}).pop(self.route, None)
