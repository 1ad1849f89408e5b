"""The diffusion objective, shared by training steps and the deterministic loss.

L = || target - eps_theta(z_t, c, t) ||^2 with z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps and
target = eps (epsilon prediction) or the velocity v (v-prediction), per the scheduler's config.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def encode_captions(tokenizer, text_encoder, captions: list[str], device: torch.device) -> torch.Tensor:
    """Caption embeddings [B, 77, D] (the last hidden state, what SD's UNet attends to)."""
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    return text_encoder(ids)[0]


def latent_distribution(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std [B, C, h, w] for images [B, 3, H, W] in [-1, 1]."""
    posterior = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return posterior.mean, posterior.std


def scaled_latents(vae, mean: torch.Tensor, std: torch.Tensor, latent_noise: torch.Tensor) -> torch.Tensor:
    """z_0 = (mean + std * n) * scaling_factor: a VAE latent *sample* with explicit noise n."""
    return (mean + std * latent_noise.to(mean)) * vae.config.scaling_factor


def sample_latents(vae, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    mean, std = latent_distribution(vae, images)
    noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean)
    return scaled_latents(vae, mean, std, noise)


def diffusion_loss(
    unet,
    scheduler,
    latents: torch.Tensor,  # [B, C, h, w] scaled z_0
    noise: torch.Tensor,  # [B, C, h, w]
    timesteps: torch.Tensor,  # [B] int64
    encoder_hidden_states: torch.Tensor,  # [B, 77, D]
    reduction: str = "mean",
) -> torch.Tensor:
    """MSE between the UNet's prediction and the target, as in the diffusers training scripts."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction type {prediction_type!r}")
    prediction = unet(noisy, timesteps, encoder_hidden_states).sample
    if reduction == "none":  # per example [B]
        return F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")
