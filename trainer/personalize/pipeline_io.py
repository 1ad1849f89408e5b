"""Loading the base pipeline the job personalizes (and building pipelines for sampling)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline

from personalize.preflight import check_base_model, resolve_volume_path
from personalize.errors import TrainerInputError
from personalize.spec import BaseModelSource
from personalize.storage.hub import resolve_snapshot

TINY_WORLD_DIR = Path(__file__).resolve().parent / "assets" / "tiny_world"


@dataclass
class Models:
    """The pipeline's parts (the loop moves them to the accelerator's device)."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    noise_scheduler: object  # DDPM-style scheduler with add_noise / get_velocity (training)
    sampling_scheduler: object  # the pipeline's own scheduler (for samples)


def builtin_tiny_world_folder() -> Path:
    for folder in (TINY_WORLD_DIR, TINY_WORLD_DIR / "pipeline"):
        if (folder / "model_index.json").is_file():
            return folder
    raise TrainerInputError(
        f"baseModel.builtin: tiny-world weights are not installed ({TINY_WORLD_DIR} has no diffusers pipeline)"
    )


def _from_pretrained(source: str | Path, what: str, **kwargs) -> StableDiffusionPipeline:
    try:
        # fp32 master weights; mixed precision later casts only the frozen parts.
        return StableDiffusionPipeline.from_pretrained(
            source, dtype=torch.float32, safety_checker=None, requires_safety_checker=False, **kwargs
        )
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise TrainerInputError(f"{what} cannot be loaded as a Stable Diffusion pipeline: {first_line}") from None


def load_base_pipeline(source: BaseModelSource) -> StableDiffusionPipeline:
    if source.builtin:
        return _from_pretrained(builtin_tiny_world_folder(), "baseModel.builtin tiny-world")
    if source.hub_id:
        folder = resolve_snapshot(source.hub_id, source.revision, source.allow_pickle_weights)
        return _from_pretrained(folder, f"baseModel.hubId {source.hub_id!r}",
                                use_safetensors=None if source.allow_pickle_weights else True)
    check_base_model(source)
    folder = resolve_volume_path(source.path or "", source.claim_name)
    return _from_pretrained(folder, f"baseModel.path {str(folder)!r}")


def models_of(pipe: StableDiffusionPipeline) -> Models:
    return Models(
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        # Training noise follows the DDPM forward process of the model's own schedule.
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        sampling_scheduler=pipe.scheduler,
    )


def sampling_pipeline(models: Models) -> StableDiffusionPipeline:
    """A pipeline around the (possibly trained) models, for class images and samples."""
    pipe = StableDiffusionPipeline(
        vae=models.vae,
        text_encoder=models.text_encoder,
        tokenizer=models.tokenizer,
        unet=models.unet,
        scheduler=models.sampling_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
