"""Loading the base pipeline the job personalizes (and building pipelines for sampling).

The model family (families/) is detected from `model_index.json`; each family loads with its
stock diffusers pipeline class: `from_pretrained` for a folder, `from_single_file` for one
checkpoint file in the original layout, with the configs of `baseModel.config` (offline).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from personalize.errors import TrainerInputError
from personalize.families.base import Models
from personalize.families.detection import check_method, family_of_index, read_model_index
from personalize.families.registry import FAMILY_CLASSES, family_for_pipeline
from personalize.preflight import base_model_config_folder, check_base_model, is_single_file, resolve_volume_path
from personalize.spec import BaseModelSource, PersonalizationJobSpec
from personalize.storage.hub import resolve_snapshot

__all__ = ["Models", "TINY_WORLD_DIR", "builtin_tiny_world_folder", "default_resolution", "load_base_pipeline", "models_of", "sampling_pipeline"]

TINY_WORLD_DIR = Path(__file__).resolve().parent / "assets" / "tiny_world"


def builtin_tiny_world_folder() -> Path:
    for folder in (TINY_WORLD_DIR, TINY_WORLD_DIR / "pipeline"):
        if (folder / "model_index.json").is_file():
            return folder
    raise TrainerInputError(
        f"baseModel.builtin: tiny-world weights are not installed ({TINY_WORLD_DIR} has no diffusers pipeline)"
    )


def _model_index(source: str | Path, what: str, **kwargs) -> dict:
    if isinstance(source, Path):
        return read_model_index(source)
    from diffusers import DiffusionPipeline  # noqa: PLC0415 (hub ids only)

    try:
        return DiffusionPipeline.load_config(source, **kwargs)
    except (OSError, ValueError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise TrainerInputError(f"{what} cannot be loaded: {first_line}") from None


def _from_pretrained(source: str | Path, what: str, spec: Optional[PersonalizationJobSpec], **kwargs):
    info = family_of_index(_model_index(source, what, **kwargs), what)
    if spec is not None:
        check_method(info, spec)
    family = FAMILY_CLASSES[info.name](spec)
    try:
        return family.load(source, **kwargs)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise TrainerInputError(f"{what} cannot be loaded as a {info.label} pipeline: {first_line}") from None


def load_base_pipeline(source: BaseModelSource, spec: Optional[PersonalizationJobSpec] = None):
    """The base model's stock pipeline; with `spec`, a method its family does not support is refused."""
    if source.builtin:
        return _from_pretrained(builtin_tiny_world_folder(), "baseModel.builtin tiny-world", spec)
    if source.hub_id:
        # The snapshot is resolved into the shared cache first, so the family loads a local folder.
        folder = resolve_snapshot(source.hub_id, source.revision, source.allow_pickle_weights)
        return _from_pretrained(folder, f"baseModel.hubId {source.hub_id!r}", spec,
                                use_safetensors=None if source.allow_pickle_weights else True)
    check_base_model(source)
    folder = resolve_volume_path(source.path or "", source.claim_name)
    if is_single_file(folder):
        return _from_single_file(folder, base_model_config_folder(source), spec)
    return _from_pretrained(folder, f"baseModel.path {str(folder)!r}", spec)


def _from_single_file(checkpoint: Path, config: Path, spec: Optional[PersonalizationJobSpec]):
    """A checkpoint file in the original layout, its pipeline's configs from `config` (offline)."""
    info = family_of_index(read_model_index(config), f"baseModel.config {str(config)!r}")
    if spec is not None:
        check_method(info, spec)
    family = FAMILY_CLASSES[info.name](spec)
    from diffusers.loaders.single_file_utils import SingleFileComponentError  # noqa: PLC0415 (single files only)

    try:
        return family.load_single_file(checkpoint, config)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError, SingleFileComponentError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise TrainerInputError(f"baseModel.path {str(checkpoint)!r} cannot be loaded as a {info.label} checkpoint "
                                f"with the configs of baseModel.config {str(config)!r}: {first_line}") from None


def default_resolution(pipe) -> int:
    """The pipeline's own default image size in pixels."""
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    sample_size = getattr(pipe, "default_sample_size", None) or denoiser.config.sample_size
    return int(sample_size) * int(pipe.vae_scale_factor)


def models_of(pipe, spec: Optional[PersonalizationJobSpec] = None) -> Models:
    return family_for_pipeline(pipe, spec).models_of(pipe)


def sampling_pipeline(models: Models):
    """The family's stock pipeline around the (possibly trained) models, for class images and samples."""
    return models.family.sampling_pipeline(models)
