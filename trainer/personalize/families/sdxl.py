"""SDXL: two CLIP text encoders (penultimate hidden states concatenated; the second one's pooled
projection), a UNet with micro-conditioning, the DDPM objective. As in diffusers'
train_dreambooth_lora_sdxl.py, the micro-conditioning of a training example is
(original height, original width, crop top, crop left, target height, target width): the image's
size before it was resized and the corner of the square cut from it (the batch's
IMAGE_GEOMETRY), then the trained size. The reference batch carries the geometry of its fixed
images, so it is fixed with them."""

from __future__ import annotations

from dataclasses import replace

import torch
from diffusers import StableDiffusionXLPipeline

from personalize.families.base import IMAGE_GEOMETRY, Conditioning, ModelFamily, Models, TextEncoder
from personalize.families.stable_diffusion import StableDiffusion, token_ids


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    pipeline_class = StableDiffusionXLPipeline

    def load(self, source, **kwargs):
        return StableDiffusionXLPipeline.from_pretrained(source, dtype=torch.float32, **kwargs)

    def load_single_file(self, checkpoint, config, **kwargs):
        return ModelFamily.load_single_file(self, checkpoint, config, **kwargs)  # no safety checker to leave out

    def models_of(self, pipe) -> Models:
        # SD's models plus the second text encoder and its tokenizer
        return replace(super().models_of(pipe),
                       extra_text_encoders={"text_encoder_2": pipe.text_encoder_2},
                       extra_tokenizers={"tokenizer_2": pipe.tokenizer_2})

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

    def identifier_encoders(self, models: Models) -> list[TextEncoder]:
        """Both CLIP encoders read the identifier: Textual Inversion learns a row in each."""
        return [*super().identifier_encoders(models),
                TextEncoder("text_encoder_2", models.extra_tokenizers["tokenizer_2"], models.extra_text_encoders["text_encoder_2"])]

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
        batch = latents.shape[0]
        target = torch.tensor([height, width], device=latents.device, dtype=latents.dtype).expand(batch, 2)
        geometry = conditioning.get(IMAGE_GEOMETRY)
        if geometry is None:  # images made at the trained size (uncropped)
            geometry = torch.cat([target, torch.zeros_like(target)], dim=1)
        time_ids = torch.cat([geometry.to(latents.device, latents.dtype), target], dim=1)  # [B, 6]
        return {
            "encoder_hidden_states": conditioning["encoder_hidden_states"],
            "added_cond_kwargs": {"text_embeds": conditioning["text_embeds"], "time_ids": time_ids},
        }
