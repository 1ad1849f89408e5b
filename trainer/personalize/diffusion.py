"""The pieces of the diffusion objective shared by training steps and the deterministic loss.

The VAE helpers are family-independent; prompt encoding and the loss itself belong to the model
family (families/), reached through `Models.family` and the `Conditioning` it produced.
"""

from __future__ import annotations

from typing import Optional

import torch

from personalize.families.base import Conditioning, Models


def encode_captions(models: Models, text_encoder, captions: list[str], device: torch.device) -> Conditioning:
    """The family's prompt conditioning for captions (e.g. SD: the last hidden state [B, 77, D])."""
    return models.family.encode_prompts(models, text_encoder, captions, device)


def latent_distribution(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std [B, C, h, w] for images [B, 3, H, W] in [-1, 1]."""
    posterior = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return posterior.mean, posterior.std


def scaled_latents(vae, mean: torch.Tensor, std: torch.Tensor, latent_noise: torch.Tensor) -> torch.Tensor:
    """z_0 = (mean + std * n - shift) * scaling_factor: a VAE latent *sample* with explicit noise n
    (the shift is SD3's and FLUX's VAE `shift_factor`, 0 for SD and SDXL)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (mean + std * latent_noise.to(mean) - shift) * vae.config.scaling_factor


def sample_latents(vae, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    mean, std = latent_distribution(vae, images)
    noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean)
    return scaled_latents(vae, mean, std, noise)


def diffusion_loss(
    denoiser,
    models: Models,
    latents: torch.Tensor,  # [B, C, h, w] scaled z_0
    noise: torch.Tensor,  # [B, C, h, w]
    timesteps: torch.Tensor,  # [B] int64 (indices into the training schedule)
    conditioning: Conditioning,
    reduction: str = "mean",
) -> torch.Tensor:
    """The family's training loss (SD: MSE to eps or v; SD3/FLUX: flow matching)."""
    return models.family.loss(denoiser, models, latents, noise, timesteps, conditioning, reduction)
