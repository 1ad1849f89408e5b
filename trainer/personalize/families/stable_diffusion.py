"""Stable Diffusion 1.x/2.x: one CLIP text encoder, a UNet, the DDPM objective
(epsilon or v-prediction, per the scheduler's config)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline

from personalize.families.base import Conditioning, ModelFamily, Models


def token_ids(tokenizer, captions: list[str], device) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


def ddpm_target(scheduler, latents, noise, timesteps) -> torch.Tensor:
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


class StableDiffusion(ModelFamily):
    name = "sd"
    pipeline_class = StableDiffusionPipeline
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")
    # diffusers' train_dreambooth_lora(_sdxl).py --train_text_encoder targets (CLIP attention)
    text_encoder_lora_target_modules = ("q_proj", "k_proj", "v_proj", "out_proj")

    def load(self, source, **kwargs):
        return super().load(source, safety_checker=None, requires_safety_checker=False, **kwargs)

    def load_single_file(self, checkpoint, config, **kwargs):
        return super().load_single_file(checkpoint, config, safety_checker=None, requires_safety_checker=False, **kwargs)

    def models_of(self, pipe) -> Models:
        return Models(
            family=self,
            denoiser=pipe.unet,
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            # Training noise follows the DDPM forward process of the model's own schedule.
            noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
            sampling_scheduler=pipe.scheduler,
        )

    def sampling_pipeline(self, models: Models):
        pipe = StableDiffusionPipeline(
            vae=models.vae,
            text_encoder=models.text_encoder,
            tokenizer=models.tokenizer,
            unet=models.denoiser,
            scheduler=models.sampling_scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def lora_layers(self, module, adapter_name: str = "default"):
        """Adapter weights in diffusers' naming, as train_dreambooth_lora(_sdxl).py saves them."""
        from diffusers.utils import convert_state_dict_to_diffusers  # noqa: PLC0415
        from peft.utils import get_peft_model_state_dict  # noqa: PLC0415

        return convert_state_dict_to_diffusers(get_peft_model_state_dict(module, adapter_name=adapter_name))

    def encode_prompts(self, models, text_encoder, captions, device) -> Conditioning:
        """The last hidden state [B, 77, D], what SD's UNet attends to."""
        return Conditioning({"encoder_hidden_states": text_encoder(token_ids(models.tokenizer, captions, device))[0]})

    def denoiser_kwargs(self, models: Models, conditioning: Conditioning, latents: torch.Tensor) -> dict:
        return {"encoder_hidden_states": conditioning["encoder_hidden_states"]}

    def loss(self, denoiser, models, latents, noise, timesteps, conditioning, reduction="mean"):
        """MSE between the UNet's prediction and the target, as in the diffusers training scripts."""
        scheduler = models.noise_scheduler
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = ddpm_target(scheduler, latents, noise, timesteps)
        prediction = denoiser(noisy, timesteps, **self.denoiser_kwargs(models, conditioning, latents)).sample
        if reduction in ("none", "both"):  # per example [B]
            error = F.mse_loss(prediction.float(), target.float(), reduction="none")
            per_example = error.mean(dim=(1, 2, 3))
            # mse_loss's "mean" is the mean of this same elementwise error: the same value, to the bit
            return (error.mean(), per_example) if reduction == "both" else per_example
        return F.mse_loss(prediction.float(), target.float(), reduction="mean")
