"""SDXL: two CLIP text encoders (penultimate hidden states concatenated; the second one's pooled
projection), a UNet with micro-conditioning (original size, crop top-left, target size), the DDPM
objective. As in diffusers' train_dreambooth_lora_sdxl.py, the micro-conditioning of a training
example is its size as trained (the loader resizes and center-crops to the resolution), so it is
(H, W, 0, 0, H, W) for every example, in training and in the reference batch alike."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, StableDiffusionXLPipeline

from personalize.families.base import Conditioning, Models
from personalize.families.stable_diffusion import StableDiffusion, token_ids


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    pipeline_class = StableDiffusionXLPipeline

    def load(self, source, **kwargs):
        return StableDiffusionXLPipeline.from_pretrained(source, dtype=torch.float32, **kwargs)

    def models_of(self, pipe) -> Models:
        return Models(
            family=self,
            denoiser=pipe.unet,
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
            sampling_scheduler=pipe.scheduler,
            extra_text_encoders={"text_encoder_2": pipe.text_encoder_2},
            extra_tokenizers={"tokenizer_2": pipe.tokenizer_2},
        )

    def sampling_pipeline(self, models: Models):
        pipe = StableDiffusionXLPipeline(
            vae=models.vae,
            text_encoder=models.text_encoder,
            text_encoder_2=models.extra_text_encoders["text_encoder_2"],
            tokenizer=models.tokenizer,
            tokenizer_2=models.extra_tokenizers["tokenizer_2"],
            unet=models.denoiser,
            scheduler=models.sampling_scheduler,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def encode_prompts(self, models, text_encoder, captions, device) -> Conditioning:
        encoders = [(models.tokenizer, text_encoder), (models.extra_tokenizers["tokenizer_2"], models.extra_text_encoders["text_encoder_2"])]
        hidden, pooled = [], None
        for tokenizer, encoder in encoders:
            out = encoder(token_ids(tokenizer, captions, device), output_hidden_states=True)
            pooled = out[0]  # the last encoder's pooled projection (text_embeds)
            hidden.append(out.hidden_states[-2])  # the penultimate layer, as SDXL was trained
        return Conditioning({"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled})

    def denoiser_kwargs(self, models: Models, conditioning: Conditioning, latents: torch.Tensor) -> dict:
        scale = 2 ** (len(models.vae.config.block_out_channels) - 1)  # the VAE's downsampling (8 for SDXL)
        height, width = (s * scale for s in latents.shape[-2:])  # in pixels
        time_ids = torch.tensor([height, width, 0, 0, height, width], device=latents.device, dtype=latents.dtype)
        return {
            "encoder_hidden_states": conditioning["encoder_hidden_states"],
            "added_cond_kwargs": {
                "text_embeds": conditioning["text_embeds"],
                "time_ids": time_ids.expand(latents.shape[0], 6),
            },
        }
