"""The rectified-flow transformers, SD3 and FLUX.1, trained as diffusers'
train_dreambooth_lora_sd3.py and train_dreambooth_lora_flux.py do:

    x_t = (1 - sigma) x_0 + sigma * eps,   target = eps - x_0   (the velocity)
    loss = mean( w(sigma) * (v_theta(x_t, t, c) - target)^2 )

Timesteps are integer indices into the training schedule's `sigmas`/`timesteps` (the
FlowMatchEulerDiscreteScheduler as configured, never re-timed), drawn with the scripts'
`weighting_scheme` density (uniform, logit_normal, mode) and weighted with theirs (sigma_sqrt,
cosmap; others 1). SD3 optionally preconditions the output (`precondition_outputs`: the
prediction becomes x_t - sigma * v and the target x_0). FLUX.1-dev's guidance-distilled
transformer gets the fixed `guidance_scale` as its guidance input; its latents are packed into
2x2 patches with positional ids, as FluxPipeline does.
"""

from __future__ import annotations

import math

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

from personalize.families.base import Conditioning, ModelFamily, Models, per_example_mse

# diffusers' script defaults (train_dreambooth_lora_flux.py / _sd3.py)
DEFAULTS = {"weighting_scheme": "none", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29,
            "guidance_scale": 3.5, "precondition_outputs": True, "max_sequence_length": 512}


class FlowMatching(ModelFamily):
    denoiser_component = "transformer"

    def option(self, name: str):
        options = getattr(self.spec, "flow_matching", None) if self.spec is not None else None
        value = getattr(options, name, None) if options is not None else None
        if hasattr(value, "value"):
            value = value.value  # an enum
        return DEFAULTS[name] if value is None else value

    def max_sequence_length(self, tokenizer) -> int:
        return min(int(self.option("max_sequence_length")), int(tokenizer.model_max_length))

    def models_of(self, pipe) -> Models:
        extra = {k: getattr(pipe, k) for k in ("text_encoder_2", "text_encoder_3") if getattr(pipe, k, None) is not None}
        tokenizers = {k: getattr(pipe, k) for k in ("tokenizer_2", "tokenizer_3") if getattr(pipe, k, None) is not None}
        return Models(
            family=self,
            denoiser=pipe.transformer,
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            noise_scheduler=FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config),
            sampling_scheduler=pipe.scheduler,
            extra_text_encoders=extra,
            extra_tokenizers=tokenizers,
        )

    def sampling_pipeline(self, models: Models):
        pipe = self.pipeline_class(
            vae=models.vae,
            text_encoder=models.text_encoder,
            tokenizer=models.tokenizer,
            transformer=models.denoiser,
            scheduler=models.sampling_scheduler,
            **models.extra_text_encoders,
            **models.extra_tokenizers,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    # ---- timesteps and weighting (the scripts' compute_density_for_timestep_sampling and
    # compute_loss_weighting_for_sd3, drawn from our generator instead of the global RNG) -------

    def draw_timesteps(self, models, n, generator):
        scheme = self.option("weighting_scheme")
        if scheme == "logit_normal":
            u = torch.sigmoid(self.option("logit_mean") + self.option("logit_std") * torch.randn(n, generator=generator))
        elif scheme == "mode":
            u = torch.rand(n, generator=generator)
            u = 1 - u - self.option("mode_scale") * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        else:
            u = torch.rand(n, generator=generator)
        return (u * self.num_timesteps(models)).long().clamp(0, self.num_timesteps(models) - 1)

    def timestep_label(self, models, index: int) -> str:
        """Flow matching is parametrised by the noise level: "sigma=0.7312"."""
        return f"sigma={float(models.noise_scheduler.sigmas[index]):.4f}"

    def loss_weighting(self, sigmas: torch.Tensor) -> torch.Tensor:
        scheme = self.option("weighting_scheme")
        if scheme == "sigma_sqrt":
            return (sigmas**-2.0).float()
        if scheme == "cosmap":
            return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
        return torch.ones_like(sigmas)

    def loss(self, denoiser, models, latents, noise, timesteps, conditioning, reduction="mean"):
        scheduler = models.noise_scheduler
        indices = timesteps.cpu()
        sigmas = scheduler.sigmas[indices].to(latents.device, latents.dtype).view(-1, 1, 1, 1)
        model_timesteps = scheduler.timesteps[indices].to(latents.device, latents.dtype)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        prediction = self.predict(denoiser, models, noisy, model_timesteps, conditioning)
        if self.preconditions_outputs:
            prediction, target = prediction * (-sigmas) + noisy, latents
        else:
            target = noise - latents
        return per_example_mse(prediction, target, self.loss_weighting(sigmas), reduction)

    preconditions_outputs = False

    def predict(self, denoiser, models, noisy, timesteps, conditioning) -> torch.Tensor:
        raise NotImplementedError


class StableDiffusion3(FlowMatching):
    name = "sd3"
    pipeline_class = StableDiffusion3Pipeline
    # train_dreambooth_lora_sd3.py's default targets
    lora_target_modules = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                           "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")

    @property
    def preconditions_outputs(self) -> bool:
        return bool(self.option("precondition_outputs"))

    def encode_prompts(self, models, text_encoder, captions, device) -> Conditioning:
        pipe = self.sampling_pipeline(models)
        embeds, _, pooled, _ = pipe.encode_prompt(
            captions, captions, captions, device=device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length(models.extra_tokenizers["tokenizer_3"]),
        )
        return Conditioning({"encoder_hidden_states": embeds, "pooled_projections": pooled})

    def predict(self, denoiser, models, noisy, timesteps, conditioning):
        return denoiser(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            pooled_projections=conditioning["pooled_projections"],
            return_dict=False,
        )[0]


class Flux(FlowMatching):
    name = "flux"
    pipeline_class = FluxPipeline
    # train_dreambooth_lora_flux.py's default targets (the double-stream blocks' attention and MLPs)
    lora_target_modules = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                           "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj",
                           "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")

    def encode_prompts(self, models, text_encoder, captions, device) -> Conditioning:
        pipe = self.sampling_pipeline(models)
        embeds, pooled, _ = pipe.encode_prompt(
            captions, captions, device=device,
            max_sequence_length=self.max_sequence_length(models.extra_tokenizers["tokenizer_2"]),
        )
        return Conditioning({"encoder_hidden_states": embeds, "pooled_projections": pooled})

    def predict(self, denoiser, models, noisy, timesteps, conditioning):
        batch, channels, height, width = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype)
        embeds = conditioning["encoder_hidden_states"]
        text_ids = torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = None
        if denoiser.config.guidance_embeds:  # FLUX.1-dev: a fixed guidance value, never drawn
            guidance = torch.full((batch,), float(self.option("guidance_scale")), device=noisy.device, dtype=noisy.dtype)
        packed_prediction = denoiser(
            hidden_states=packed,
            timestep=timesteps / 1000,
            guidance=guidance,
            pooled_projections=conditioning["pooled_projections"],
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        scale = 2 ** (len(models.vae.config.block_out_channels) - 1)
        return FluxPipeline._unpack_latents(packed_prediction, height * scale, width * scale, scale)
