"""Family name -> ModelFamily class, and the family of a loaded pipeline."""

from __future__ import annotations

from typing import Any, Optional

from personalize.families.base import ModelFamily
from personalize.families.detection import BY_PIPELINE_CLASS, FAMILIES
from personalize.families.flow_matching import Flux, StableDiffusion3
from personalize.families.sdxl import StableDiffusionXL
from personalize.families.stable_diffusion import StableDiffusion

FAMILY_CLASSES: dict[str, type[ModelFamily]] = {
    cls.name: cls for cls in (StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux)
}
assert set(FAMILY_CLASSES) == {f.name for f in FAMILIES}
assert all(bool(FAMILY_CLASSES[f.name].text_encoder_lora_target_modules) == f.text_encoder_lora for f in FAMILIES)


def family_for_pipeline(pipe, spec: Optional[Any] = None) -> ModelFamily:
    """The family of a loaded pipeline (by its class), configured by the job spec's options."""
    info = BY_PIPELINE_CLASS.get(type(pipe).__name__)
    if info is None:
        raise ValueError(f"no model family for pipeline class {type(pipe).__name__}")
    return FAMILY_CLASSES[info.name](spec)
